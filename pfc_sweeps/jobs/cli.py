"""Checks ``launch.py`` runs before Hydra starts, so that they cost no torch import.

They turn Hydra's several-line messages into the project's one line ``error: ...`` and
refuse a run dir held by another job, or a ``hydra.sweep.dir`` held by another sweep, before
Hydra writes anything into it (the sweep itself takes its lock in
:class:`~pfc_sweeps.jobs.callbacks.SweepReport`, before any job and before ``sbatch``).
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
    """Exit with one line on stderr for a busy run or sweep dir (1) or a bad override (2)."""
    from pfc_sweeps.jobs.jobdir import JobDirError, check_not_busy
    from pfc_sweeps.jobs.sweepdir import check_sweep_not_busy

    overrides = [a for a in argv if "=" in a and a[0] != "-"]
    multirun = bool({"-m", "--multirun"} & set(argv))
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    dirs = [a.split("=", 1)[1] for a in overrides if a.startswith(key)]
    try:
        if dirs:
            (check_sweep_not_busy if multirun else check_not_busy)(Path(dirs[-1]))
    except JobDirError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    from pfc_sweeps.config import ConfigError, check_override_keys

    try:
        check_override_keys(overrides, _group_options(conf_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
