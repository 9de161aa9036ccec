"""The GPU check script and the MNIST-recipe timing script (issue 13) on this machine."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
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


def _run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=cwd,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def _ratio_consistent(num: str, den: str, ratio: str) -> bool:
    """Whether the printed `ratio` can be num/den for the unrounded times behind the printed
    `num` and `den`: each printed number is off by at most half a unit of its last digit."""

    def half_ulp(s: str) -> float:
        return 0.5 * 10.0 ** -len(s.partition(".")[2])

    lo = (float(num) - half_ulp(num)) / (float(den) + half_ulp(den))
    hi = (float(num) + half_ulp(num)) / max(float(den) - half_ulp(den), 1e-12)
    return lo - half_ulp(ratio) <= float(ratio) <= hi + half_ulp(ratio)


def test_ratio_consistent_is_able_to_fail():
    # a CI run printed these: 0.0035 / 0.0145 = 0.24 rounds to 0.2, so they agree
    assert _ratio_consistent("0.004", "0.014", "0.2")
    assert not _ratio_consistent("0.004", "0.014", "0.4")  # at most 0.0045 / 0.0135 = 0.33
    assert not _ratio_consistent("2.000", "1.000", "2.2")
    assert _ratio_consistent("2.000", "1.000", "2.00")


def test_bench_metrics_smoke_ratios_match_its_times(tmp_path):
    """A tiny run of every part; each printed ratio of best times is consistent with the
    printed times (so the table is computed from what was measured)."""
    import re

    out = _run("bench_metrics.py", "--scale", "0.005", "--dim", "24", "--layers", "4",
               "--repeat", "2", "--device", "cpu", cwd=tmp_path)  # fmt: skip
    lines = {line[:3]: line for line in out.splitlines() if line.startswith("(")}
    assert set(lines) == {"(a)", "(b)", "(c)"}
    a = re.search(r"naive ([\d.]+)s, .* ([\d.]+)s -> speedup ([\d.]+)x", lines["(a)"])
    assert _ratio_consistent(a[1], a[2], a[3]), lines["(a)"]
    c = re.search(
        r"bare forward ([\d.]+)s; cached ([\d.]+)s = ([\d.]+)x \(([\d.]+)x\)", lines["(c)"]
    )
    assert _ratio_consistent(c[2], c[1], c[3]), lines["(c)"]
    assert "independent of N" in out


def test_bench_train_smoke_reports_the_floor(tmp_path):
    out = _run("bench_train.py", "--scale", "0.003", "--rounds", "1", "--width", "16",
               "--blocks", "2", cwd=tmp_path)  # fmt: skip
    for key in ("ours / baseline", "ours+metrics / baseline", "floor:", "checkpoint write"):
        assert key in out, out


@pytest.mark.slow
def test_bench_cifar100_smoke_ratios_follow_from_its_times(tmp_path):
    out = _run("bench_cifar100.py", "--n", "100", "--rounds", "1", cwd=tmp_path)
    times = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(\w+): ([\d.]+) s", out, re.M)}
    assert set(times) == {"train", "forward", "metrics"}, out
    ratio = re.search(r"metric pass / eval forward: ([\d.]+)", out).group(1)
    assert _ratio_consistent(times["metrics"], times["forward"], ratio), out
    assert re.search(r"goal <= floor \+ 0\.05 = [\d.]+: (met|MISSED)", out), out


@pytest.mark.parametrize(("block", "linears_per_block"), [("bench", 1), ("preact_bn", 2)])
def test_bench_scaling_smoke_prints_its_ratio_and_floor(tmp_path, block, linears_per_block):
    """A tiny K axis: each row's ratio is (forward + tracker) / forward of its printed times,
    and its floor is 1 + the tracker's multiply-adds over the forward's, counted here from the
    net's shape (bench: L blocks of one d x d Linear on the input; the project's FC ResNet: a
    d x d stem, then L blocks of two)."""
    d, layers = 16, 3
    out = _run("bench_scaling.py", "--axes", "k", "--base", f"n=300,d={d},layers={layers}",
               "--values", "4,24", "--repeat", "1", "--block", block,
               "--png", str(tmp_path / "s.png"), cwd=tmp_path)  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["k"]]
    rows = [r for r in rows if len(r) == 9]
    assert [int(r[1]) for r in rows] == [4, 24]
    stem = 0 if block == "bench" else d * d
    for _, k, fwd, trk, ratio, floor, per_row, per_pass, _ in rows:
        k = int(k)
        f, t, h = float(fwd), float(trk), 0.0005  # printed to 3 decimals
        lo, hi = (f + t - 2 * h) / (f + h), (f + t + 2 * h) / max(f - h, 1e-9)
        assert lo - 0.005 <= float(ratio) <= hi + 0.005
        assert float(per_row) > 1.0 and float(per_pass) > 0.0
        forward = stem + layers * linears_per_block * d * d + k * d
        tracker = (layers + 1) * (k * d + min(d, k) ** 2) + 2 * k * d
        assert float(floor) == pytest.approx(1 + tracker / forward, abs=0.006)
    assert (tmp_path / "s.png").exists()


class _SleepyTracker:
    """A stand-in tracker whose steps take known times: updates 20 ms, end_pass 100 ms,
    compute 50 ms."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _step(self, name: str, seconds: float) -> None:
        self.calls.append(name)
        time.sleep(seconds)

    def update(self, features, labels) -> None:
        self._step("update", 0.02)

    def end_pass(self) -> None:
        self._step("end_pass", 0.1)

    def compute(self) -> None:
        self._step("compute", 0.05)


def test_bench_scaling_phases_split_updates_from_per_pass_work():
    """two_pass_phases: both passes' updates are per-row time (3 batches x 2 passes x 20 ms),
    the two end_pass calls and compute per-pass time (2 x 100 + 50 ms), in the protocol order."""
    spec = importlib.util.spec_from_file_location(
        "bench_scaling", REPO / "benchmarks" / "bench_scaling.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tr = _SleepyTracker()
    phases = mod.two_pass_phases(tr, [(None, None)] * 3, torch.device("cpu"))
    assert tr.calls == ["update"] * 3 + ["end_pass"] + ["update"] * 3 + ["end_pass", "compute"]
    assert 0.12 <= phases["per_row"] < 0.12 + 0.08  # one end_pass more: 0.22
    assert 0.25 <= phases["per_pass"] < 0.25 + 0.08
