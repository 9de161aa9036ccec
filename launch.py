"""Hydra entry point: ``python launch.py [-m] [overrides...]``; see README.md."""

import sys
from pathlib import Path

CONF = Path(__file__).parent / "conf"


def _precheck(argv: list[str]) -> None:
    """One-line errors before Hydra starts: unknown keys, a run dir held by another job."""
    from pfc_sweeps.jobdir import JobDirError, check_not_busy

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
        check_override_keys(overrides, {p.name for p in CONF.iterdir() if p.is_dir()})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    _precheck(sys.argv[1:])

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pfc_sweeps.config import register_configs  # noqa: E402
from pfc_sweeps.tasks import main as run_task  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_task(cfg)


if __name__ == "__main__":
    main()
