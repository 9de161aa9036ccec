"""The W&B layout (pfc_sweeps.results.loggers), checked in the offline run files themselves.

The offline ``.wandb`` files are read with tests/helpers/wandb_reader.py (no network, no wandb
reader); every value is compared with the job's parquet table.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HELPERS, REPO, launch
from wandb_reader import read_runs, records, wandb_files

from pfc_sweeps.results.loggers import rows_to_keys, run_tags, train_summary, wandb_config
from pfc_sweeps.results.schema import (
    NC3,
    PFC1,
    PFC2,
    PFC3,
    RUN_ID_FILE,
    TEST_ACC,
    TRAIN_ACC,
    read_curves,
    read_results,
)
from pfc_sweeps.results.wandb_charts import wide_results

SMALL = ["train.epochs=4", "arch.width=32", "arch.blocks=3", "train.geodesic_points=11"]
PFC = (PFC1, PFC2, PFC3)


def _rows(records_):
    return pd.DataFrame(records_, columns=["layer", "metric", "value", "model", "lam"])


def _expected_key(r) -> str:
    """The documented key of a parquet row, written out independently of the logger."""
    if r.model != "net":
        return f"{r.metric}/{r.model}"
    return f"{r.metric}/layer_{r.layer:02d}" if r.layer >= 0 else r.metric


def _history(run) -> dict[tuple[int, str], list[float]]:
    """(epoch, key) -> every value logged for it, over all history rows of all files."""
    out: dict[tuple[int, str], list[float]] = {}
    for row in run.history:
        if "epoch" not in row:
            continue
        for k, v in row.items():
            if isinstance(v, int | float) and not k.startswith("_"):
                out.setdefault((int(row["epoch"]), k), []).append(float(v))
    return out


def _missing_rows(df: pd.DataFrame, run) -> list[tuple[int, str]]:
    """Parquet rows that no history row holds at 1e-9."""
    hist = _history(run)
    bad = []
    for r in df.itertuples(index=False):
        got = hist.get((int(r.epoch), _expected_key(r)), [])
        if not any(abs(v - r.value) <= 1e-9 for v in got):
            bad.append((int(r.epoch), _expected_key(r)))
    return bad


# ----------------------------------------------------------------------------- unit


def test_train_rows_become_metric_sections_and_scalars():
    rows = _rows(
        [
            (0, PFC1, 1.5, "net", math.nan),
            (3, PFC1, 0.5, "net", math.nan),
            (10, NC3, 0.25, "net", math.nan),
            (-1, TRAIN_ACC, 1.0, "net", math.nan),
        ]
    )
    assert rows_to_keys(rows) == {
        f"{PFC1}/layer_00": 1.5,
        f"{PFC1}/layer_03": 0.5,
        f"{NC3}/layer_10": 0.25,
        TRAIN_ACC: 1.0,
    }


def test_surrogate_keys_are_metric_then_model_and_lambda_only_for_a_grid():
    grid = _rows(
        [
            (-1, PFC1, 3.0, "mufm", 0.001),
            (-1, PFC1, 4.0, "mufm", 0.002),
            (-1, PFC1, 20.0, "data", math.nan),
        ]
    )
    assert rows_to_keys(grid) == {
        f"{PFC1}/mufm/lam=0.001": 3.0,
        f"{PFC1}/mufm/lam=0.002": 4.0,
        f"{PFC1}/data": 20.0,
    }
    assert rows_to_keys(_rows([(-1, PFC1, 3.0, "mufm", 0.001)])) == {f"{PFC1}/mufm": 3.0}


def test_config_keeps_only_the_groups_of_the_task_and_tags_name_the_setting():
    cfg = {
        "task": {"name": "train", "models": []},
        "dataset": {"name": "digits"},
        "arch": {"name": "digits"},
        "loss": {"name": "ce"},
        "lam": {"lam": 0.001},
        "surrogate": {"steps": 5},
        "gaussian": {"dim": 20},
        "train": {"epochs": 3},
        "seed": 0,
    }
    assert set(wandb_config(cfg)) == {"task", "dataset", "arch", "loss", "train", "seed"}
    assert run_tags(cfg, ["mine"]) == [
        "task:train",
        "dataset:digits",
        "arch:digits",
        "loss:ce",
        "mine",
    ]
    on_gaussian = {**cfg, "dataset": {"name": "gaussian"}}
    assert set(wandb_config(on_gaussian)) == {*wandb_config(cfg), "gaussian"}
    sur = {**cfg, "task": {"name": "surrogate", "models": ["mufm", "ufm"]}, "loss": {"name": "mse"}}
    assert set(wandb_config(sur)) == {"task", "loss", "lam", "surrogate", "gaussian", "seed"}
    assert run_tags(sur) == ["task:surrogate", "dataset:gaussian", "arch:mufm+ufm", "loss:mse"]


def test_wide_results_table_holds_every_row():
    rng = np.random.default_rng(0)
    recs = []
    for epoch in (1, 2):
        for layer in range(3):
            for m in PFC:
                recs.append((epoch, "train", layer, layer / 2, m, rng.random(), "net", math.nan))
        recs.append((epoch, "test", -1, math.nan, TEST_ACC, rng.random(), "net", math.nan))
    cols = ["epoch", "split", "layer", "rel_pos", "metric", "value", "model", "lam"]
    df = pd.DataFrame(recs, columns=cols)
    wide = wide_results(df)
    assert len(wide) == 2 * 4
    back = wide.melt(id_vars=["epoch", "layer", "model", "lam", "rel_pos"], var_name="metric")
    back = back.dropna(subset=["value"])
    key = ["epoch", "layer", "metric"]
    merged = df.merge(back, on=key, suffixes=("", "_w"))
    assert len(merged) == len(df) and np.array_equal(merged["value"], merged["value_w"])


def test_train_summary_first_last_ratio_and_flags():
    recs = []
    vals = {PFC1: [2.0, 1.0, 0.5], PFC2: [0.8, 0.9, 0.4], PFC3: [0.5, 0.7, 0.9]}
    for m, v in vals.items():
        for layer, x in enumerate(v):
            recs.append((3, layer, layer / 2, m, x))
            recs.append((1, layer, layer / 2, m, 9.0))  # an earlier epoch: ignored
    recs += [(3, -1, math.nan, TRAIN_ACC, 0.75), (3, -1, math.nan, TEST_ACC, 0.5)]
    df = pd.DataFrame(recs, columns=["epoch", "layer", "rel_pos", "metric", "value"])
    df = df.assign(
        run_id="r", task="train", dataset="digits", arch="digits", loss="ce", seed=0,
        split="train", model="net", lam=math.nan, lam_w=math.nan,
    )  # fmt: skip
    s = train_summary(df)
    assert (s[f"{PFC1}_first"], s[f"{PFC1}_last"], s[f"{PFC1}_ratio"]) == (2.0, 0.5, 0.25)
    assert s[f"{PFC3}_ratio"] == pytest.approx(0.9 / 0.5, abs=1e-15)
    assert s[f"{PFC1}_monotone"] is True and s[f"{PFC2}_monotone"] is False
    assert (s[TRAIN_ACC], s[TEST_ACC]) == (0.75, 0.5)


def test_reader_follows_records_split_over_blocks(tmp_path):
    """A >32 KiB record is split FIRST/MIDDLE/LAST over blocks: the reader joins it."""
    from wandb.proto import wandb_internal_pb2 as pb

    sys.path.insert(0, str(HELPERS))
    import zlib

    from wandb_reader import BLOCK, CHUNK, HEADER

    recs = [pb.Record(), pb.Record()]
    recs[0].history.item.add(key="big", value_json=json.dumps("x" * 70_000))
    recs[1].history.item.add(key="small", value_json="1.5")
    out = bytearray(HEADER.pack(b":W&B", 0xBEE1, 0))
    for rec in recs:
        data = rec.SerializeToString()
        first = True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < CHUNK.size:
                out += b"\0" * left
                continue
            n = min(len(data), left - CHUNK.size)
            last = n == len(data)
            kind = (1 if last else 2) if first else (4 if last else 3)
            crc = zlib.crc32(data[:n], zlib.crc32(bytes([kind])))
            out += CHUNK.pack(crc, n, kind) + data[:n]
            data, first = data[n:], False
            if last:
                break
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(out) + b"\x01\x02\x03")  # + a torn tail
    got = list(records(path))
    assert [r.history.item[0].key for r in got] == ["big", "small"]
    assert len(json.loads(got[0].history.item[0].value_json)) == 70_000


# ----------------------------------------------------------------------------- acceptance


def test_digits_run_layout_in_the_offline_file(tmp_path):
    out = tmp_path / "d"
    p = launch(*SMALL, f"hydra.run.dir={out}", unset=("WANDB_DIR",))
    assert p.returncode == 0, p.stderr
    df, _ = read_results(out)
    run = read_runs(wandb_files(out))
    assert run.run_ids == {(out / RUN_ID_FILE).read_text().strip()}
    # keys of PFC1-3 for every layer, values equal to the parquet
    layers = sorted(df.loc[df["layer"] >= 0, "layer"].unique())
    keys = {k for row in run.history for k in row}
    assert {f"{m}/layer_{l:02d}" for m in PFC for l in layers} <= keys
    assert not any(k.startswith("layer") for k in keys)
    assert _missing_rows(df, run) == []
    # epoch is the x-axis of everything; the end-of-job row is at the last epoch
    assert run.metrics["*"] == {"step_metric": "epoch", "glob": True}
    assert "epoch" in run.metrics
    assert max(r.get("epoch", 0) for r in run.history) == df["epoch"].max() == 4
    # charts and figures
    for m in PFC:
        for chart in (f"charts/{m}_by_layer", f"depth_profile/{m}"):
            vis = run.config["_wandb"]["visualize"][chart]
            assert vis["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    _check_depth_profile(out, run, df, read_curves(out))
    for fig in ("fig2_training_curves", "fig3_depth_profile"):
        assert run.summary[f"figures/{fig}"]["_type"] == "image-file"
    # the results artifact, the results table with all rows, config, tags, summary
    arts = [a for a in run.artifacts if a["type"] == "results"]
    assert len(arts) == 1 and sorted(arts[0]["files"]) == ["curves.parquet", "metrics.parquet"]
    per_row = df.groupby(["epoch", "layer"]).ngroups
    assert run.summary["tables/results"]["nrows"] == per_row
    assert not any(k == "lam" or k.startswith("lam/") for k in run.config)
    assert run.tags == ["task:train", "dataset:digits", "arch:digits", "loss:ce"]
    last = df.loc[df["epoch"] == 4]
    acc = last.loc[last["metric"] == TEST_ACC, "value"].item()
    assert run.summary[TEST_ACC] == acc
    pfc1 = last.loc[last["metric"] == PFC1].set_index("layer")["value"]
    assert run.summary[f"{PFC1}_ratio"] == pytest.approx(pfc1[layers[-1]] / pfc1[0], rel=1e-12)
    assert isinstance(run.summary[f"{PFC3}_monotone"], bool)


def _check_depth_profile(out: Path, run, df: pd.DataFrame, curves: pd.DataFrame) -> None:
    """The pfc2 depth-profile chart's table: observed layers and the geodesic curve."""
    files_dir = next(out.rglob("offline-run-*")) / "files"
    table = run.summary[f"Custom Chart Tables/depth_profile/{PFC2}_table"]
    data = json.loads((files_dir / table["path"]).read_text())
    got = pd.DataFrame(data["data"], columns=data["columns"])
    last = df.loc[df["epoch"] == df["epoch"].max()]
    obs = last.loc[(last["metric"] == PFC2) & (last["layer"] >= 0)].sort_values("layer")
    geo = curves.loc[(curves["epoch"] == curves["epoch"].max()) & (curves["metric"] == PFC2)]
    geo = geo.sort_values("t")
    mine = got.loc[got["lineKey"] == "observed (layers)"]
    assert np.allclose(mine["step"], obs["rel_pos"], atol=1e-12)
    assert np.allclose(mine["lineVal"], obs["value"], atol=1e-12)
    pred = got.loc[got["lineKey"] == "geodesic prediction"]
    assert np.allclose(pred["lineVal"], geo["value"], atol=1e-12) and len(pred) == 11


def test_surrogate_run_layout(tmp_path):
    out = tmp_path / "s"
    p = launch("task=mufm", "surrogate.steps=100", "surrogate.log_every=50",
               "lam.grid=[0.001,0.002]", f"hydra.run.dir={out}", unset=("WANDB_DIR",))  # fmt: skip
    assert p.returncode == 0, p.stderr
    df, _ = read_results(out)
    run = read_runs(wandb_files(out))
    assert run.metrics["*"]["step_metric"] == "step"
    hist = {}
    for row in run.history:
        for k, v in row.items():
            hist[(row.get("step"), k)] = v
    for r in df.itertuples(index=False):
        key = f"{r.metric}/{r.model}" + ("" if math.isnan(r.lam) else f"/lam={r.lam:g}")
        assert hist[(r.epoch, key)] == pytest.approx(r.value, abs=1e-9)
    assert not {"dataset", "arch", "train", "optim"} & set(run.config)
    assert run.summary["tables/final_by_lam"]["nrows"] == 2  # (mufm, λ) x 2
    assert "task:surrogate" in run.tags and "arch:mufm" in run.tags


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_keeps_every_row(tmp_path):
    """Acceptance 11.2: every parquet row is in the union of the job's offline run files."""
    out = tmp_path / "k"
    args = [*SMALL, "train.epochs=10", f"hydra.run.dir={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "SLURM_JOB_ID")}
    env["WANDB_MODE"] = "offline"

    def start():
        return subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), *args],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def last_epoch() -> int:
        try:
            return int(read_results(out)[0]["epoch"].max())
        except (FileNotFoundError, OSError, ValueError):
            return 0

    def kill_when(proc, ready, what):
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.01)
        assert proc.poll() is None, f"the job ended before {what}"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, W&B's service included
        proc.wait()

    n_dirs = lambda: len(wandb_files(out))  # noqa: E731
    # 1: mid-training, just after a table write; 2: while the resumed job starts its
    # W&B run (and replays); 3: mid-training again, right after a checkpoint
    kill_when(start(), lambda: last_epoch() >= 3, "epoch 3")
    kill_when(start(), lambda: n_dirs() >= 2, "its W&B run started")
    before = last_epoch()
    ckpt = out / "checkpoint.pt"
    t0 = ckpt.stat().st_mtime
    kill_when(
        start(), lambda: ckpt.stat().st_mtime > t0 and last_epoch() >= before + 1, "more epochs"
    )
    assert not (out / "done").exists()
    p = start()
    assert p.wait(timeout=300) == 0
    df, meta = read_results(out)
    assert meta["status"] == "done" and df["epoch"].max() == 10
    files = wandb_files(out)
    assert len(files) == 4  # one offline run per process, all with the job's id
    run = read_runs(files)
    assert run.run_ids == {(out / RUN_ID_FILE).read_text().strip()}
    assert _missing_rows(df, run) == []
