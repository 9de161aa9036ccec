"""Checks ``launch.py`` runs before Hydra starts, so that they cost no torch import.

They turn Hydra's several-line messages into the project's one line ``error: ...`` and
refuse a run dir held by another job, or a ``hydra.sweep.dir`` held by another sweep, before
Hydra writes anything into it (the sweep itself takes its lock in
:class:`~pfc_sweeps.jobs.callbacks.SweepReport`, before any job and before ``sbatch``).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["check_override_keys", "precheck"]


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
    from pfc_sweeps.config import ConfigError

    try:
        check_override_keys(overrides, _group_options(conf_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_override_keys(overrides: list[str], groups: dict[str, list[str]]) -> None:
    """Raise a one-line ConfigError for a command-line override Hydra would reject verbosely.

    Run before Hydra composes the config: an unknown key (``train.epoch=5``, with the nearest
    valid key), an option a config group does not have (``dataset=nosuch``, with the options
    in ``groups``) and a value of the wrong type (``seed=x``). ``hydra.*`` keys are left to
    Hydra, and so are sweep values (``-m seed=0,1``), which Hydra checks job by job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    from omegaconf import OmegaConf

    from pfc_sweeps.config import Config, ConfigError, schema_keys

    known = set(schema_keys())
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return  # Hydra reports its own grammar errors
    typed = OmegaConf.structured(Config)
    for o in parsed:
        key = o.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or "@" in key:
            continue
        if key in groups:
            _check_group_option(key, o, groups[key])
            continue
        if key not in known and not any(key.startswith(k + ".") for k in _free_nodes()):
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key} is not a config key{hint}")
        if not o.is_sweep_override() and not o.is_delete():
            _check_type(typed, key, o.value())


def _check_group_option(group: str, override: Any, options: list[str]) -> None:
    """``dataset=nosuch``: the option must be one of the group's YAML files."""
    from pfc_sweeps.config import ConfigError

    if override.is_sweep_override() or override.is_delete():
        return
    value = override.value()
    if isinstance(value, str) and value not in options:
        raise ConfigError(
            f"{group}={value} is not an option of the {group} group; "
            f"available: {', '.join(sorted(options))}"
        )


def _check_type(typed: Any, key: str, value: Any) -> None:
    """``seed=x``: the value must fit the schema's type for ``key``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pfc_sweeps.config import ConfigError

    try:
        OmegaConf.update(typed, key, value, merge=True, force_add=False)
    except OmegaConfBaseException as e:
        kind = getattr(e, "msg", str(e)).splitlines()[0]
        raise ConfigError(f"{key}={value!r} is invalid: {kind}") from None


def _free_nodes() -> list[str]:
    """Keys whose value is free-form (typed ``Any``): any sub-key is allowed."""
    from omegaconf import AnyNode, DictConfig, OmegaConf

    from pfc_sweeps.config import Config

    def walk(node: DictConfig, prefix: str) -> Iterator[str]:
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, AnyNode):
                yield f"{prefix}{key}"
            elif isinstance(child, DictConfig):
                yield from walk(child, f"{prefix}{key}.")

    return list(walk(OmegaConf.structured(Config), ""))
