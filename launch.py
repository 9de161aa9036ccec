"""Hydra entry point: ``python launch.py [-m] [overrides...]``; see README.md."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pfc_sweeps.config import ConfigError, check_override_keys, register_configs
from pfc_sweeps.tasks import main as run_task

CONF = Path(__file__).parent / "conf"
register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


if __name__ == "__main__":
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    try:
        check_override_keys([a for a in sys.argv[1:] if "=" in a and a[0] != "-"], groups)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
