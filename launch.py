"""Hydra entry point: ``python launch.py [-m] [overrides...]``; see README.md."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    from pfc_sweeps.jobs.cli import precheck

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: several ranks
        from pfc_sweeps.jobs.distributed import prelaunch

        sys.argv = prelaunch(sys.argv)
    precheck(sys.argv[1:], Path(__file__).parent / "conf")

import hydra
from omegaconf import DictConfig

from pfc_sweeps.config import register_configs
from pfc_sweeps.jobs.dispatch import main as run_task

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


if __name__ == "__main__":
    main()
