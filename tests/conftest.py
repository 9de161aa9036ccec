"""Shared fixtures: run ``launch.py`` as a user would, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

REPO = Path(__file__).resolve().parents[1]
#: tests/helpers/: the float64 reference, fake data sets in the real formats, a user's model
#: and data set (importable as ``user_model``, ``user_data`` by jobs: put on the PYTHONPATH)
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))
SHARED = REPO.parent / "shared"


def launch(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict | None = None,
    unset: tuple[str, ...] = (),
):
    """Run ``python launch.py ARGS`` from the repo root; returns the CompletedProcess."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", **(env or {})}
    for var in ("SLURM_JOB_ID", *unset):
        full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_launch():
    return launch


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch, tmp_path_factory):
    """Keep W&B offline and its files out of the repo and the home directory."""
    base = tmp_path_factory.getbasetemp() / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in [
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
    ]:
        if var not in os.environ:
            monkeypatch.setenv(var, str(base / sub))


@pytest.fixture
def no_md5(monkeypatch):
    """Test only: accept generated CIFAR / STL10 files (existence instead of torchvision's md5)."""

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", exists)
