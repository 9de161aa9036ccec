"""End-to-end: ``launch.py`` as a user runs it, in subprocesses (train and surrogate tasks)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, launch

from pfc_sweeps.results.schema import ALIGNMENT, LR, PFC1, PFC2, PFC3, TRAIN_ACC, read_results

TINY = [
    "logger=none",
    "train.epochs=3",
    "arch.width=32",
    "arch.blocks=3",
    "train.geodesic_points=5",
]
IDS = ["run_id", "sweep_id"]


def _frame(job_dir) -> pd.DataFrame:
    df, _ = read_results(job_dir)
    return df.sort_values(["epoch", "metric", "layer", "rel_pos"]).reset_index(drop=True)


def test_default_train_rows_match_an_independent_computation(tmp_path):
    out = tmp_path / "d"
    p = launch(*TINY, f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    assert "Results:" in p.stdout and "metrics.parquet" in p.stdout
    df, meta = read_results(out)
    assert meta["status"] == "done" and (out / "done").exists()
    assert meta["config"]["dataset"]["name"] == "digits"
    assert sorted(df["epoch"].unique()) == [1, 2, 3]
    per_layer = df[(df.metric == PFC1) & (df.epoch == 3)].sort_values("layer")
    assert list(per_layer["layer"]) == [0, 1, 2, 3]
    assert per_layer["rel_pos"].iloc[0] == 0 and per_layer["rel_pos"].iloc[-1] == pytest.approx(1)

    # Recompute PFC1 and PFC3 at the last epoch from the checkpointed model, by brute force.
    from pfc_sweeps.data.builtin import load_dataset
    from pfc_sweeps.nets.resnets import build_model

    data = load_dataset("digits", seed=0)
    model = build_model("fc", data.in_shape, 10, width=32, blocks=3, block="preact_bn")
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        _, feats = model(data.train_x)
    y = data.train_y.numpy()
    for layer, h in enumerate(feats):
        h = h.double().numpy()
        means = np.stack([h[y == k].mean(0) for k in range(10)])
        g = means.mean(0)
        sw = ((h - means[y]) ** 2).sum(1).mean()
        sb = ((means - g) ** 2).sum(1).mean()
        dist = ((h[:, None, :] - means[None]) ** 2).sum(-1)
        ncc = (dist.argmin(1) == y).mean()
        row = df[(df.epoch == 3) & (df.layer == layer)].set_index("metric")["value"]
        assert row[PFC1] == pytest.approx(sw / sb, rel=1e-5)
        assert row[PFC3] == pytest.approx(ncc, abs=1e-12)
    # train accuracy is a fraction, the lr follows the schedule (decay at 1/3 and 2/3)
    lr = df[df.metric == LR].sort_values("epoch")["value"].tolist()
    assert lr == pytest.approx([0.01, 0.001, 0.0001])


def test_rerun_of_a_done_job_does_nothing(tmp_path):
    out = tmp_path / "d"
    assert launch(*TINY, f"hydra.run.dir={out}").returncode == 0
    before = (out / "metrics.parquet").read_bytes()
    p = launch(*TINY, f"hydra.run.dir={out}")
    assert p.returncode == 0
    assert "done already" in p.stdout
    assert (out / "metrics.parquet").read_bytes() == before


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    args = [
        "logger=none",
        "train.epochs=12",
        "arch.width=64",
        "arch.blocks=4",
        "train.geodesic_points=5",
    ]
    ref = tmp_path / "ref"
    assert launch(*args, f"hydra.run.dir={ref}").returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args, f"hydra.run.dir={out}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    ckpt = out / "checkpoint.pt"
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert 3 <= killed_at < 12 and not (out / "done").exists()
    p = launch(*args, f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr
    assert "Resuming" in p.stdout
    a, b = _frame(ref).drop(columns=IDS), _frame(out).drop(columns=IDS)
    pd.testing.assert_frame_equal(a, b)  # identical values, no duplicate rows
    assert not b.duplicated(["epoch", "layer", "metric", "rel_pos", "split"]).any()


def test_divergence_is_recorded_and_exits_nonzero(tmp_path):
    out = tmp_path / "div"
    p = launch(*TINY, "optim.lr=1e6", f"hydra.run.dir={out}")
    assert p.returncode != 0
    assert "diverged" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    _, meta = read_results(out)
    assert meta["status"] == "diverged"
    assert not (out / "done").exists()


def test_missing_dataset_is_one_line_naming_the_path(tmp_path):
    p = launch(
        "dataset=cifar10", "dataset.root=no/such/dir", "dataset.download=false", "logger=none",
        f"hydra.run.dir={tmp_path / 'c'}", timeout=120,
    )  # fmt: skip
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no/such/dir" in lines[0], p.stderr
    assert not list(tmp_path.rglob("*.parquet"))


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_makes_one_parquet_per_job(tmp_path, launcher):
    sweep = tmp_path / "s"
    p = launch(
        "-m", *TINY, "train.epochs=2", "seed=0,1", f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    frames = [_frame(sweep / str(i)) for i in (0, 1)]
    assert [set(f["seed"]) for f in frames] == [{0}, {1}]
    assert frames[0]["run_id"].iloc[0] != frames[1]["run_id"].iloc[0]
    assert frames[0]["sweep_id"].iloc[0] == frames[1]["sweep_id"].iloc[0]
    # different seeds give different numbers
    assert not np.allclose(frames[0]["value"], frames[1]["value"])


def test_multirun_reports_a_failed_job_and_keeps_the_others(tmp_path):
    sweep = tmp_path / "s"
    p = launch("-m", "task=mufm", "surrogate.steps=50", "surrogate.log_every=50", "logger=none",
               "lam.lam=0.001,-1", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode != 0
    assert "lam.lam" in p.stderr
    assert (sweep / "0" / "done").exists() and not (sweep / "1" / "metrics.parquet").exists()


def test_wandb_offline_one_run_per_job_in_one_group(tmp_path):
    sweep = tmp_path / "w"
    p = launch("-m", "task=mufm", "lam.lam=0.001,0.005", "logger=wandb", "surrogate.steps=100",
               "surrogate.log_every=50", f"hydra.sweep.dir={sweep}", timeout=300,
               unset=("WANDB_DIR",))  # fmt: skip
    # without WANDB_DIR, each job's offline run lives in its own job directory
    assert p.returncode == 0, p.stderr
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2, runs
    run_ids = [read_results(sweep / str(i))[0]["run_id"].iloc[0] for i in (0, 1)]
    sweep_id = read_results(sweep / "0")[0]["sweep_id"].iloc[0]
    for run_dir, rid in zip(runs, run_ids, strict=True):
        assert run_dir.name.endswith(rid)
        blob = next(run_dir.glob("*.wandb")).read_bytes()
        assert sweep_id.encode() in blob  # the group
        assert b"mufm" in blob  # the job type
    assert len(list(sweep.glob("*/metrics.parquet"))) == 2


@pytest.mark.slow
def test_default_run_shows_progressive_collapse(tmp_path):
    """Issue 4, acceptance 1: `python launch.py hydra.run.dir=out/d logger=none` on digits."""
    out = tmp_path / "d"
    t0 = time.perf_counter()
    p = launch(f"hydra.run.dir={out}", "logger=none")
    assert p.returncode == 0, p.stderr
    assert time.perf_counter() - t0 < 120
    df, _ = read_results(out)
    last = df[df.epoch == df.epoch.max()]
    assert last.set_index("metric").loc[TRAIN_ACC, "value"] == 1.0
    per_layer = last[last.layer >= 0].pivot_table(index="layer", columns="metric", values="value")
    pfc1, pfc3 = per_layer[PFC1].to_numpy(), per_layer[PFC3].to_numpy()
    assert (np.diff(pfc1) <= 0.02 * pfc1[:-1]).all(), pfc1  # decreasing within 2%
    assert (np.diff(pfc3) >= -0.02 * pfc3[:-1]).all(), pfc3  # increasing within 2%
    assert pfc1[-1] < 0.5 * pfc1[0]


def _last(job_dir) -> pd.DataFrame:
    df, _ = read_results(job_dir)
    return df[df.epoch == df.epoch.max()]


@pytest.mark.slow
def test_paper_fig4_acceptance(tmp_path):
    """Issue 3, acceptance 1: UFM collapses, MUFM lies between UFM and the data."""
    out = tmp_path / "f4"
    p = launch("experiment=paper_fig4", f"hydra.run.dir={out}", "logger=none")
    assert p.returncode == 0, p.stderr
    w = _last(out).pivot_table(index="model", columns="metric", values="value")
    ufm, mufm, data = w.loc["ufm"], w.loc["mufm"], w.loc["data"]
    assert ufm[PFC1] < 1e-2 and ufm[PFC2] < 1e-2 and ufm[PFC3] == 1
    assert ufm[PFC1] < mufm[PFC1] < data[PFC1] and ufm[PFC2] < mufm[PFC2] < data[PFC2]
    assert mufm[PFC3] >= data[PFC3]


@pytest.mark.slow
def test_paper_fig5_acceptance(tmp_path):
    """Issue 3, acceptance 2: as λ grows, PFC1 and PFC2 of H grow and the alignment drops."""
    out = tmp_path / "f5"
    p = launch("experiment=paper_fig5", f"hydra.run.dir={out}", "logger=none")
    assert p.returncode == 0, p.stderr
    last = _last(out)
    w = last[last.model == "mufm"].pivot_table(index="lam", columns="metric", values="value")
    w = w.sort_index()
    assert (
        len(w) == 40 and w.index[0] == pytest.approx(0.0005) and w.index[-1] == pytest.approx(0.02)
    )
    for metric, sign in [(PFC1, 1), (PFC2, 1), (ALIGNMENT, -1)]:
        v = w[metric].to_numpy()
        assert (sign * np.diff(v) / np.abs(v[:-1]) > -0.01).all(), (metric, v)
        assert sign * (v[-1] - v[0]) > 0


def test_surrogate_objective_explosion_ends_diverged(tmp_path):
    """Issue 9: `task=mufm surrogate.lr=100` ended `done` with an objective of 1.7e34."""
    out = tmp_path / "sdiv"
    p = launch("task=mufm", "surrogate.lr=100", "surrogate.steps=300", "logger=none",
               f"hydra.run.dir={out}")  # fmt: skip
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "diverged" in lines[0] and "surrogate.lr" in lines[0], p.stderr
    _, meta = read_results(out)
    assert meta["status"] == "diverged"
    assert not (out / "done").exists()
