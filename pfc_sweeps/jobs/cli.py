"""Checks ``launch.py`` runs before Hydra starts, so that they cost no torch import.

They turn Hydra's several-line messages into the project's one line ``error: ...`` and
refuse a run dir held by another job before Hydra writes anything into it.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["precheck"]


def _group_options(conf_dir: Path) -> dict[str, list[str]]:
    """Config group -> its options (the YAML files of ``conf/<group>/``), Hydra's own left out."""
    return {
        group.name: [f.stem for f in group.glob("*.yaml")]
        for group in conf_dir.iterdir()
        if group.is_dir() and group.name != "hydra"
    }


def precheck(argv: list[str], conf_dir: Path) -> None:
    """Exit with one line on stderr for a busy run dir (1) or a bad override (2)."""
    from pfc_sweeps.jobs.jobdir import JobDirError, check_not_busy

    overrides = [a for a in argv if "=" in a and a[0] != "-"]
    run_dirs = [a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir=")]
    try:
        if run_dirs and not {"-m", "--multirun"} & set(argv):
            check_not_busy(Path(run_dirs[-1]))
    except JobDirError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    from pfc_sweeps.config import ConfigError, check_override_keys

    try:
        check_override_keys(overrides, _group_options(conf_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
