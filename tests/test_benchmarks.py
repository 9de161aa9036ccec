"""The GPU check script and the MNIST-recipe timing script (issue 13) on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the whole GPU check on a GPU")
def test_device_check_without_gpu_says_so_and_exits_0():
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU present" in out.stdout
    assert "summary" not in out.stdout  # nothing was run


def test_device_train_runs_and_reports(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_train.py"), "--epochs", "2",
         "--n", "300", "--width", "32", "--blocks", "3", "--device", "cpu",
         "--precision", "bf16"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert lines[-1].startswith("SUMMARY mnist-recipe N=300 bf16: epoch ")
    assert "metric pass" in lines[-1] and "peak GPU memory" in lines[-1]
