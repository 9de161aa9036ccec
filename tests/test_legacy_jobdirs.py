"""Job dirs written by version 0.1 (the flat layout, before the subpackages) keep working.

The fixtures under ``tests/fixtures/v0_1_jobdirs/`` were made by the code of commit 5eb9f87
(``python launch.py hydra.run.dir=... train.epochs=2 arch.width=16 arch.blocks=3
logger=none``, and ``arch=resnet18 train.epochs=1 dataset.subset_per_class=5 logger=none
train.metrics_every=1`` without its 86 MB checkpoint). Their fingerprints and configs hold the
0.1 ``_target_`` path ``pfc_sweeps.models.torchvision_resnet``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from conftest import launch
from inprocess import run_in_process
from test_own_model import _metric_rows

from analysis.aggregate import aggregate
from pfc_sweeps.nets.legacy import LEGACY_TARGETS, current_target
from pfc_sweeps.results.schema import CHECKPOINT_FILE, FINGERPRINT_FILE, read_results

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_jobdirs"
DIGITS = ["train.epochs=2", "arch.width=16", "arch.blocks=3", "logger=none"]
RESNET18 = ["arch=resnet18", "train.epochs=1", "dataset.subset_per_class=5", "logger=none",
            "train.metrics_every=1"]  # fmt: skip


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _results(job: Path) -> dict[str, bytes]:
    """The job's own files (Hydra rewrites .hydra/ and launch.log on every start)."""
    return {p.name: p.read_bytes() for p in job.iterdir() if p.is_file() and p.name != "launch.log"}


def test_every_legacy_target_imports_and_the_fixture_uses_one():
    import hydra.utils

    for old, new in LEGACY_TARGETS.items():
        assert current_target(old) == new and hydra.utils.get_method(new) is not None
    fp = json.loads((FIXTURES / "resnet18" / FINGERPRINT_FILE).read_text())
    assert fp["arch.model._target_"] in LEGACY_TARGETS


def test_rerun_of_a_v0_1_job_says_done(tmp_path):
    for name, args in [("digits", DIGITS), ("resnet18", RESNET18)]:
        job = _copy(name, tmp_path)
        before = _results(job)
        p = launch(*args, f"hydra.run.dir={job}", timeout=300)
        assert p.returncode == 0, p.stderr
        assert "is done already" in p.stdout, (name, p.stdout, p.stderr)
        assert _results(job) == before


def test_measure_on_a_v0_1_checkpoint_equals_its_last_epoch(tmp_path):
    job = _copy("digits", tmp_path)
    want, _ = read_results(job)
    out = tmp_path / "measure"
    run_in_process(out, *DIGITS, "task=measure", f"arch.checkpoint={job / CHECKPOINT_FILE}")
    got, _ = read_results(out)
    # the fixture was made with the CI's torch; another build's float32 kernels round the
    # forward differently (3e-10 relative on torch 2.3.1): then the float32 path's bound
    tol = {"rtol": 0, "atol": 1e-12} if _fixture_torch() else {"rtol": 1e-5, "atol": 1e-9}
    pd.testing.assert_frame_equal(_metric_rows(got, 2), _metric_rows(want, 2), **tol)


def _fixture_torch() -> bool:
    """Is this the torch release the fixtures were made with (the CI pin)?"""
    pins = (Path(__file__).parents[1] / "constraints-ci.txt").read_text().splitlines()
    pin = next(line.split("==")[1].strip() for line in pins if line.startswith("torch=="))
    return torch.__version__.split("+")[0] == pin


def test_aggregate_reads_v0_1_job_dirs(tmp_path):
    agg = aggregate([FIXTURES])
    assert set(agg.table["arch"]) == {"digits", "resnet18"}
    for name in ("digits", "resnet18"):
        want, _ = read_results(FIXTURES / name)
        assert len(agg.table[agg.table["run_id"] == want["run_id"].iloc[0]]) == len(want)
