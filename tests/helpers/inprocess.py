"""Run a job as ``launch.py`` would, in this process (no subprocess: fast, and patchable)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from pfc_sweeps.config import register_configs
from pfc_sweeps.jobs import dispatch

REPO = Path(__file__).resolve().parents[2]
register_configs()


def run_in_process(out_dir: Path, *overrides: str) -> None:
    """What ``python launch.py OVERRIDES hydra.run.dir=OUT_DIR`` does, without a subprocess."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.name = "launch"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    out_dir.mkdir(parents=True, exist_ok=True)
    dispatch.main(cfg)
