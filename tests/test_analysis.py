"""Tests of analysis/ (issue 5): aggregation, figures, summary.

All inputs are generated here in the format of pfc_sweeps.results.schema and laid out as the
producers do: <sweep>/<job_num>/{metrics.parquet, curves.parquet, run_id, done, .hydra/}
next to <sweep>/multirun.yaml.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle

from analysis import aggregate as agg_mod
from analysis import discovery, figures
from analysis.aggregate import (
    NoResultsError,
    SchemaError,
    aggregate,
    drop_duplicate_rows,
    load,
    read_aggregate,
)
from analysis.discovery import expected_job_count
from pfc_sweeps.results import schema as schema_mod
from pfc_sweeps.results import summary
from pfc_sweeps.results.figures import FigureDataError
from pfc_sweeps.results.schema import (
    ALIGNMENT,
    COLUMNS,
    CURVE_COLUMNS,
    CURVE_KEY,
    CURVES_FILE,
    EFFECTIVE_DEPTH,
    ENERGY_RATIO,
    GEODESIC_ERR_METRICS,
    GRAD_NORM,
    LR,
    NC1,
    OBJECTIVE,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    RESULT_KEY,
    RESULTS_FILE,
    STRAIGHTNESS,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    write_table,
)
from pfc_sweeps.results.summary import is_monotone, summarize_surrogate, summarize_train
from pfc_sweeps.results.tidy import ci95

matplotlib.use("Agg")

# ----------------------------------------------------------------------------- generators


def _frame(rows: list[dict], meta: dict, columns=COLUMNS) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for k, v in meta.items():
        if k in columns and k not in df.columns:
            df[k] = v
    for col in columns:
        if col not in df.columns:
            df[col] = np.nan
    return discovery.normalize_table(df, columns=columns)


def _train_meta(run_id, *, dataset, seed, sweep_id):
    return dict(
        run_id=run_id,
        sweep_id=sweep_id,
        task="train",
        dataset=dataset,
        arch="fc_resnet",
        loss="ce",
        seed=seed,
        lam=np.nan,
        lam_w=np.nan,
        model="net",
    )


def pfc_profile(n_layers: int, epoch: int, *, bump: float = 0.0, bump_layer: int = 2) -> dict:
    """Per-layer values that are monotone in depth (PFC1, PFC2 down, PFC3 up); ``bump``
    multiplies PFC1 at ``bump_layer`` by (1 + bump) relative to the layer before it."""
    f = 1.0 / (epoch + 1)
    pfc1 = [10.0 * 0.5**k * f for k in range(n_layers)]
    if bump:
        pfc1[bump_layer] = pfc1[bump_layer - 1] * (1 + bump)
    pfc2 = [1.0 - 0.2 * k * (1 - f / 2) for k in range(n_layers)]
    pfc3 = [0.5 + 0.1 * k + 0.01 * epoch for k in range(n_layers)]
    return {PFC1: pfc1, PFC2: pfc2, PFC3: pfc3}


def train_frame(
    run_id: str,
    *,
    dataset: str = "digits",
    seed: int = 0,
    n_layers: int = 4,
    epochs: tuple[int, ...] = (0, 1, 2),
    bump: float = 0.0,
    pfc3_decreasing: bool = False,
    noise: float = 0.0,
    sweep_id: str = "sw",
) -> pd.DataFrame:
    """A training run's rows: per-layer PFC/NC rows and run-level scalars."""
    rng = np.random.default_rng(seed)
    L = n_layers - 1
    rel = np.sqrt(np.arange(n_layers) / L)  # r_0 = 0, r_L = 1, non-uniform
    rows = []
    for e in epochs:
        prof = pfc_profile(n_layers, e, bump=bump)
        if pfc3_decreasing:
            prof[PFC3] = prof[PFC3][::-1]
        for m, vals in prof.items():
            for k, v in enumerate(vals):
                v = v * (1 + noise * rng.standard_normal())
                rows.append(
                    dict(epoch=e, split="train", layer=k, rel_pos=rel[k], metric=m, value=v)
                )
                rows.append(
                    dict(
                        epoch=e,
                        split="train",
                        layer=k,
                        rel_pos=rel[k],
                        metric=GEODESIC_ERR_METRICS[PFC_METRICS.index(m)],
                        value=0.01 * k,
                    )
                )
        for k in range(n_layers):
            rows.append(
                dict(
                    epoch=e,
                    split="train",
                    layer=k,
                    rel_pos=rel[k],
                    metric=NC1,
                    value=1.0 / (k + 1),
                )
            )
        for m, v in [
            (EFFECTIVE_DEPTH, 2.0),
            (STRAIGHTNESS, 0.8 + 0.05 * e),
            (ENERGY_RATIO, 1.5 - 0.1 * e),
            (TRAIN_LOSS, 1.0 / (e + 1)),
            (TRAIN_ACC, 0.9 + 0.01 * e),
            (LR, 0.01),
        ]:
            rows.append(dict(epoch=e, split="train", layer=-1, rel_pos=np.nan, metric=m, value=v))
        rows.append(
            dict(
                epoch=e,
                split="test",
                layer=-1,
                rel_pos=np.nan,
                metric=TEST_ACC,
                value=0.8 + 0.01 * e,
            )
        )
    return _frame(rows, _train_meta(run_id, dataset=dataset, seed=seed, sweep_id=sweep_id))


def train_curves(
    run_id: str,
    *,
    dataset: str = "digits",
    seed: int = 0,
    n_layers: int = 4,
    epochs: tuple[int, ...] = (0, 1, 2),
    bump: float = 0.0,
    n_t: int = 5,
    sweep_id: str = "sw",
) -> pd.DataFrame:
    """The run's geodesic curves (curves.parquet): straight lines at the last epoch."""
    last = epochs[-1]
    prof = pfc_profile(n_layers, last, bump=bump)
    rows = []
    for t in np.linspace(0, 1, n_t):
        for m, vals in prof.items():
            v = vals[0] + t * (vals[-1] - vals[0])
            rows.append(dict(epoch=last, t=t, metric=m, value=v))
    meta = _train_meta(run_id, dataset=dataset, seed=seed, sweep_id=sweep_id)
    return _frame(rows, meta, CURVE_COLUMNS)


def mufm_value(metric: str, lam: float, model: str) -> float:
    """Closed-form stand-in values: MUFM moves from the ETF toward the data as λ grows."""
    if model == "data":
        return {
            PFC1: 2.0,
            PFC2: 0.6,
            PFC3: 0.7,
            ALIGNMENT: 0.0,
            OBJECTIVE: 0.0,
            GRAD_NORM: 0.0,
        }[metric]
    if model == "ufm":
        return {
            PFC1: 1e-4,
            PFC2: 1e-3,
            PFC3: 1.0,
            ALIGNMENT: 1.2,
            OBJECTIVE: 0.1,
            GRAD_NORM: 1e-6,
        }[metric]
    return {
        PFC1: 0.1 + 50 * lam,
        PFC2: 0.05 + 10 * lam,
        PFC3: 1.0 - 5 * lam,
        ALIGNMENT: 1.0 / (1 + 100 * lam),
        OBJECTIVE: 0.2,
        GRAD_NORM: 1e-5,
    }[metric]


SUR_METRICS = (PFC1, PFC2, PFC3, ALIGNMENT, OBJECTIVE, GRAD_NORM)


def surrogate_frame(
    run_id: str,
    lams: tuple[float, ...],
    *,
    models: tuple[str, ...] = ("data", "mufm"),
    task: str = "mufm",
    lam_w: float = 0.005,
    seed: int = 0,
    steps: tuple[int, ...] = (0, 500),
    sweep_id: str = "s",
) -> pd.DataFrame:
    """A surrogate job's rows (one job may hold a λ grid), as pfc_sweeps.surrogate writes them:
    model="data" rows once per logged step with lam = lam_w = NaN, and arch = model.
    Solution rows at steps before the last hold junk (123), so a figure that does not take
    the last step is caught."""
    rows = []

    def add(step, m, v, model, lam, lw):
        rows.append(
            dict(epoch=step, split="train", layer=-1, rel_pos=np.nan, metric=m, value=v)
            | dict(model=model, lam=lam, lam_w=lw, arch=model)
        )

    for step in steps:
        if "data" in models:
            for m in (PFC1, PFC2, PFC3):
                add(step, m, mufm_value(m, 0, "data"), "data", np.nan, np.nan)
        for lam in lams:
            for model in (m for m in models if m != "data"):
                for m in SUR_METRICS:
                    v = mufm_value(m, lam, model) if step == steps[-1] else 123.0
                    add(step, m, v, model, lam, lam_w)
    meta = dict(
        run_id=run_id,
        sweep_id=sweep_id,
        task=task,
        dataset="gaussian",
        loss="mse",
        seed=seed,
    )
    return _frame(rows, meta)


def write_job(
    job_dir: Path,
    df: pd.DataFrame | None,
    *,
    status: str = "done",
    done: bool = True,
    config: dict | None = None,
    run_id: str | None = None,
    curves: pd.DataFrame | None = None,
) -> Path:
    """Lay a job folder out as the producers do (pfc_sweeps.results.schema.write_table)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ".hydra").mkdir(exist_ok=True)
    (job_dir / ".hydra" / "config.yaml").write_text("task: x\n")
    if run_id is None and df is not None:
        run_id = str(df["run_id"].iloc[0])
    if run_id:
        (job_dir / "run_id").write_text(run_id + "\n")
    meta = {"config": config or {"run_id": run_id}, "status": status}
    if curves is not None:
        write_table(job_dir / CURVES_FILE, curves, meta)
    if df is not None:
        # own columns: a test may write a table that breaks the schema on purpose
        write_table(job_dir / RESULTS_FILE, df, meta, columns={})
    if done:
        (job_dir / "done").write_text("")
    return job_dir


def write_multirun_yaml(sweep: Path, overrides: list[str]) -> None:
    lines = ["hydra:", "  overrides:", "    task:"] + [f"    - {o}" for o in overrides]
    (sweep / "multirun.yaml").write_text("\n".join(lines) + "\n")


def _png_nonempty(path: Path) -> None:
    assert path.stat().st_size > 1000
    img = matplotlib.image.imread(path)
    assert img[..., :3].std() > 0.01  # not a blank canvas


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_sweep_with_failed_job_duplicates_and_mixed_tasks(tmp_path, capsys):
    sweep = tmp_path / "s"
    sweep.mkdir()
    write_multirun_yaml(sweep, ["logger=none", "seed=0,1,2,3,4"])
    train = train_frame("tr0")
    sur = surrogate_frame("su1", (0.001, 0.002))
    # requeued surrogate job: every row written twice
    write_job(sweep / "0", train, config={"task": "train", "seed": 0})
    write_job(
        sweep / "1", pd.concat([sur, sur], ignore_index=True), config={"task": "mufm", "seed": 1}
    )
    write_job(sweep / "2", surrogate_frame("su2", (0.001,)), status="failed", done=False)
    j3 = write_job(sweep / "3", None, done=False, run_id="su3")
    (j3 / "launch.log").write_text(
        "[INFO] start\nTraceback (most recent call last):\nRuntimeError: CUDA oom\n"
    )
    sub = sweep / ".submitit" / "77_2"  # hydra-submitit layout: <sweep>/.submitit/<array>_<num>
    sub.mkdir(parents=True)
    (sub / "77_2_0_log.err").write_text("Traceback (most recent call last):\nValueError: boom\n")
    # job 4 never started (multirun.yaml asks for 5)
    out = tmp_path / "agg" / "all.parquet"
    rc = agg_mod.main([str(sweep), "-o", str(out)])
    cap = capsys.readouterr()
    assert rc == 0
    for k in ("2", "3", "4"):
        assert str(sweep / k) in cap.err
    assert str(sweep / "0") not in cap.err
    assert "RuntimeError: CUDA oom" in cap.err
    assert "ValueError: boom" in cap.err and "77_2_0_log.err" in cap.err
    assert "[failed]" in cap.err and "[no_results]" in cap.err and "[missing]" in cap.err
    assert "not finished" in cap.out  # summary printed

    res = read_aggregate(out)
    assert [p.name for p in out.parent.iterdir()] == ["all.parquet"]  # no tmp file left
    # independent count: every generated row once; the failed job's rows excluded
    assert len(res.table) == len(train) + len(sur)
    assert not res.table.duplicated(list(RESULT_KEY)).any()
    assert res.n_duplicates == len(sur) and res.n_conflicts == 0
    assert set(res.table["run_id"]) == {"tr0", "su1"}
    assert set(res.table["task"]) == {"train", "mufm"}
    assert list(res.table.columns) == list(COLUMNS)
    assert res.config("tr0") == {"task": "train", "seed": 0}
    assert res.config("su1")["task"] == "mufm"
    states = {Path(j.job_dir).name: j.state for j in res.jobs}
    assert states == {"0": "done", "1": "done", "2": "failed", "3": "no_results", "4": "missing"}
    # same values as written (sorted comparison, float-exact)
    key = ["run_id", "epoch", "layer", "metric", "model", "lam", "rel_pos"]
    want = pd.concat([train, sur]).sort_values(key).reset_index(drop=True)
    got = res.table.sort_values(key).reset_index(drop=True)
    np.testing.assert_array_equal(got["value"].to_numpy(), want["value"].to_numpy())


def test_expected_job_count_from_multirun_yaml(tmp_path):
    write_multirun_yaml(tmp_path, ["task=mufm", "lam.lam=0.0005,0.001,0.005,0.02", "seed=range(3)"])
    assert expected_job_count(tmp_path / "multirun.yaml") == 12
    (tmp_path / "bad.yaml").write_text(": : :")
    assert expected_job_count(tmp_path / "bad.yaml") is None


def test_drop_duplicates_keeps_last_and_keys_on_t_only_for_curve_rows():
    df = train_frame("r", epochs=(0,))
    n = len(df)
    again = df.copy()
    per_layer = again["layer"] >= 0
    again.loc[per_layer, "rel_pos"] += 1e-9  # recomputed depth coordinate: still the same row
    again.loc[per_layer, "value"] += 1.0  # re-recorded with another value: keep the last
    out, n_dup, n_conf = drop_duplicate_rows(pd.concat([df, again], ignore_index=True))
    assert len(out) == n and n_dup == n
    assert n_conf == int(per_layer.sum())
    got = out.loc[out["layer"] >= 0].sort_values(["metric", "layer"])["value"].to_numpy()
    want = again.loc[per_layer].sort_values(["metric", "layer"])["value"].to_numpy()
    np.testing.assert_array_equal(got, want)
    # geodesic curve points at different t are distinct measurements (curves table)
    curves = train_curves("r", epochs=(0,), n_t=5)
    out, n_dup, _ = drop_duplicate_rows(pd.concat([curves, curves], ignore_index=True), CURVE_KEY)
    assert n_dup == len(curves)
    assert (out["metric"] == PFC1).sum() == 5


def test_no_results_names_the_searched_dirs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoResultsError, match=str(empty)):
        aggregate([empty])
    assert agg_mod.main([str(empty), "-o", str(tmp_path / "x.parquet")]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
    # only a failed job: error lists it
    write_job(tmp_path / "f" / "0", surrogate_frame("a", (0.001,)), status="failed", done=False)
    with pytest.raises(NoResultsError, match="failed"):
        aggregate([tmp_path / "f"])
    with pytest.raises(NoResultsError, match="does-not-exist"):
        aggregate([tmp_path / "does-not-exist"])


def test_include_unfinished_and_broken_parquet(tmp_path):
    write_job(tmp_path / "0", train_frame("a"))
    write_job(tmp_path / "1", train_frame("b", seed=1), status="running", done=False)
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "metrics.parquet").write_bytes(b"not parquet")
    (tmp_path / "2" / "done").write_text("")
    res = aggregate([tmp_path])
    assert set(res.table["run_id"]) == {"a"}
    assert {Path(j.job_dir).name: j.state for j in res.jobs} == {
        "0": "done",
        "1": "unfinished",
        "2": "broken",
    }
    res2 = aggregate([tmp_path], include_unfinished=True)
    assert set(res2.table["run_id"]) == {"a", "b"}


def test_schema_error_names_file(tmp_path):
    df = train_frame("a").drop(columns=["value"])
    write_job(tmp_path / "0", df)
    rec, table = discovery.inspect_job(tmp_path / "0")
    assert rec.state == "broken" and table is None
    assert "value" in rec.detail
    with pytest.raises(SchemaError, match=re.escape("src.parquet")):
        discovery.normalize_table(df, source="src.parquet")


def test_load_accepts_aggregate_and_job_parquet_files(tmp_path):
    write_job(tmp_path / "s" / "0", train_frame("a"))
    write_job(tmp_path / "t" / "0", surrogate_frame("b", (0.001,)))
    agg_file = agg_mod.write_aggregate(aggregate([tmp_path / "s"]), tmp_path / "all.parquet")
    res = load([agg_file, tmp_path / "t" / "0" / "metrics.parquet"])
    assert set(res.table["run_id"]) == {"a", "b"}
    assert set(res.runs["run_id"]) == {"a", "b"}
    again = load([agg_file, agg_file])  # the same file twice: no duplicated rows
    assert len(again.table) == len(read_aggregate(agg_file).table)
    bogus = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(bogus)
    with pytest.raises(ValueError, match=re.escape("x.parquet")):
        load([bogus])


# ----------------------------------------------------------------------------- figures


def _data_lines(ax):
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 0]


def test_fig2_one_line_per_layer_coloured_by_depth_and_log_pfc1():
    df = pd.concat([train_frame("a", n_layers=4), train_frame("b", dataset="gaussian", n_layers=3)])
    fig = figures.fig2_training_curves(df)
    axes = np.array(fig.axes[:6]).reshape(3, 2)
    for j, n_layers in enumerate((4, 3)):  # columns sorted: digits, gaussian
        for i, m in enumerate((PFC1, PFC2, PFC3)):
            ax = axes[i, j]
            lines = _data_lines(ax)
            assert len(lines) == n_layers
            assert ax.get_yscale() == ("log" if m == PFC1 else "linear")
            # line for layer l holds that layer's values over epochs 0, 1, 2
            for k, ln in enumerate(lines):
                np.testing.assert_array_equal(ln.get_xdata(), [0, 1, 2])
                want = [pfc_profile(n_layers, e)[m][k] for e in (0, 1, 2)]
                np.testing.assert_allclose(ln.get_ydata(), want)
            colors = [to_rgb(ln.get_color()) for ln in lines]
            assert len(set(colors)) == n_layers
            # viridis: dark (layer 0) -> bright (layer L)
            lum = [0.3 * r + 0.6 * g + 0.1 * b for r, g, b in colors]
            assert lum == sorted(lum)
    assert "Tr" in axes[0, 0].get_ylabel() and "NCC accuracy" in axes[2, 0].get_ylabel()
    assert [axes[0, j].get_title() for j in range(2)] == ["digits", "gaussian"]


def test_fig2_seeds_mean_and_95_band():
    df = pd.concat([train_frame(f"r{s}", seed=s, noise=0.1) for s in range(3)])
    fig = figures.fig2_training_curves(df, metrics=(PFC2,))
    ax = fig.axes[0]
    lines = _data_lines(ax)
    assert len(lines) == 4
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4
    sub = df.loc[(df["metric"] == PFC2) & (df["layer"] == 1)].groupby("epoch")["value"]
    np.testing.assert_allclose(lines[1].get_ydata(), sub.mean().to_numpy())
    # band edges = Student-t 95% CI, checked against a direct formula at epoch 0
    x = df.loc[(df["metric"] == PFC2) & (df["layer"] == 1) & (df["epoch"] == 0), "value"].to_numpy()
    half = 4.302652729911275 * x.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    verts = bands[1].get_paths()[0].vertices
    at0 = verts[np.isclose(verts[:, 0], 0.0), 1]
    np.testing.assert_allclose(sorted(at0)[0], x.mean() - half, rtol=1e-9)
    np.testing.assert_allclose(sorted(at0)[-1], x.mean() + half, rtol=1e-9)


def test_ci95_matches_formula_and_handles_small_n():
    assert all(math.isnan(v) for v in ci95([1.0]))
    lo, hi = ci95([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2  # t_{0.975, 3}
    assert lo == pytest.approx(2.5 - half) and hi == pytest.approx(2.5 + half)


def test_fig3_points_per_layer_and_geodesic_curve():
    df = pd.concat([train_frame("a", n_layers=5), train_frame("b", dataset="gaussian", n_layers=3)])
    curves = pd.concat(
        [train_curves("a", n_layers=5, n_t=7), train_curves("b", dataset="gaussian", n_layers=3)]
    )
    fig = figures.fig3_depth_profile(df, curves=curves)
    axes = np.array(fig.axes[:6]).reshape(3, 2)
    for j, (n_layers, n_t) in enumerate(((5, 7), (3, 5))):
        for i, m in enumerate((PFC1, PFC2, PFC3)):
            ax = axes[i, j]
            obs, geo = _data_lines(ax)
            rel = np.sqrt(np.arange(n_layers) / (n_layers - 1))
            np.testing.assert_allclose(obs.get_xdata(), rel)
            np.testing.assert_allclose(obs.get_ydata(), pfc_profile(n_layers, 2)[m])  # last epoch
            assert obs.get_marker() == "o" and obs.get_linestyle() == "-"
            assert len(geo.get_xdata()) == n_t
            np.testing.assert_allclose(geo.get_xdata(), np.linspace(0, 1, n_t))
            assert to_rgb(obs.get_color()) == to_rgb("tab:green")
            assert to_rgb(geo.get_color()) == to_rgb("tab:blue")
            assert ax.get_yscale() == ("log" if m == PFC1 else "linear")


def test_fig3_seed_error_bars():
    df = pd.concat([train_frame(f"r{s}", seed=s, noise=0.1) for s in range(3)])
    fig = figures.fig3_depth_profile(df, metrics=(PFC2,))
    ax = fig.axes[0]
    obs = _data_lines(ax)[0]
    want = (
        df.loc[(df["metric"] == PFC2) & (df["epoch"] == 2) & (df["layer"] >= 0)]
        .groupby("layer")["value"]
        .mean()
    )
    np.testing.assert_allclose(obs.get_ydata(), want.to_numpy())
    assert len(ax.collections) >= 1  # the error bars


def _bars(ax):
    return [p for c in ax.containers for p in c.patches if isinstance(p, Rectangle)]


def test_fig4_bars_at_last_step_with_log_ufm_panel():
    df = pd.concat(
        [
            surrogate_frame("a", (0.001,), models=("data", "mufm", "ufm")),
            train_frame("t"),  # ignored by Fig. 4
        ]
    )
    fig = figures.fig4_surrogate_bars(df)
    ax_a, ax_b = fig.axes[:2]
    for ax, model in ((ax_a, "mufm"), (ax_b, "ufm")):
        bars = _bars(ax)
        assert len(bars) == 6  # 3 metrics x (data, model)
        heights = sorted(b.get_height() for b in bars)
        want = sorted(
            [mufm_value(m, 0.001, "data") for m in (PFC1, PFC2, PFC3)]
            + [mufm_value(m, 0.001, model) for m in (PFC1, PFC2, PFC3)]
        )
        np.testing.assert_allclose(heights, want)
    assert ax_a.get_yscale() == "linear" and ax_b.get_yscale() == "log"
    assert "MUFM" in ax_a.get_title() and "UFM" in ax_b.get_title()


def test_fig4_picks_the_lambda_nearest_the_paper_setting():
    df = surrogate_frame("grid", (0.0005, 0.0011, 0.005, 0.02))
    fig = figures.fig4_surrogate_bars(df)
    (ax,) = fig.axes[:1]
    assert len(fig.axes) == 1  # no UFM rows -> only panel (a)
    heights = sorted(b.get_height() for b in _bars(ax))
    want = sorted([mufm_value(m, 0.0011, k) for m in (PFC1, PFC2, PFC3) for k in ("data", "mufm")])
    np.testing.assert_allclose(heights, want)
    assert "0.0011" in ax.get_title()
    with pytest.raises(FigureDataError):
        figures.fig4_surrogate_bars(train_frame("t"))


LAMS = (0.0005, 0.001, 0.005, 0.02)


@pytest.mark.parametrize("layout", ["grid_job", "one_lam_per_job"])
def test_fig5_same_curve_from_grid_and_per_lambda_jobs(layout):
    if layout == "grid_job":
        df = surrogate_frame("g", LAMS)
    else:
        df = pd.concat([surrogate_frame(f"j{k}", (lam,)) for k, lam in enumerate(LAMS)])
    fig = figures.fig5_lambda_tradeoff(df)
    axes = fig.axes[:4]
    assert len(axes) == 4
    ratios = np.array(LAMS) / 0.005
    for ax, m in zip(axes, (PFC1, PFC2, PFC3, ALIGNMENT), strict=True):
        lines = _data_lines(ax)
        curve = lines[0]
        np.testing.assert_allclose(curve.get_xdata(), ratios)
        np.testing.assert_allclose(curve.get_ydata(), [mufm_value(m, lam, "mufm") for lam in LAMS])
        if m != ALIGNMENT:  # dashed data reference
            assert len(lines) == 2
            np.testing.assert_allclose(lines[1].get_ydata(), mufm_value(m, 0, "data"))
        else:
            assert len(lines) == 1
        assert ax.get_xscale() == "log"  # ratios 0.1 .. 4
    assert "lambda" in axes[0].get_xlabel()


def test_fig5_needs_two_lambdas_and_averages_seeds():
    with pytest.raises(FigureDataError, match="2 distinct"):
        figures.fig5_lambda_tradeoff(surrogate_frame("a", (0.001,)))
    a = surrogate_frame("a", LAMS, seed=0)
    b = surrogate_frame("b", LAMS, seed=1)
    b["value"] = np.where(b["model"] == "mufm", b["value"] + 0.1, b["value"])
    fig = figures.fig5_lambda_tradeoff(pd.concat([a, b]), metrics=(PFC2,))
    curve = _data_lines(fig.axes[0])[0]
    np.testing.assert_allclose(
        curve.get_ydata(), [mufm_value(PFC2, lam, "mufm") + 0.05 for lam in LAMS]
    )
    assert any(isinstance(c, PolyCollection) for c in fig.axes[0].collections)


def test_fig_paths_one_line_per_condition():
    df = pd.concat(
        [
            train_frame("a"),
            train_frame("b", dataset="gaussian"),
            train_frame("c", dataset="gaussian", seed=1),
        ]
    )
    fig = figures.fig_paths(df)
    for ax, m in zip(fig.axes[:2], (STRAIGHTNESS, ENERGY_RATIO), strict=True):
        lines = _data_lines(ax)
        assert len(lines) == 3  # digits, gaussian (2 seeds -> 1 mean line), reference at 1
        want = [0.8, 0.85, 0.9] if m == STRAIGHTNESS else [1.5, 1.4, 1.3]
        np.testing.assert_allclose(lines[0].get_ydata(), want)
        np.testing.assert_allclose(lines[2].get_ydata(), [1.0, 1.0])


# ----------------------------------------------------------------------------- summary


@pytest.mark.parametrize(
    ("values", "direction", "tol", "want"),
    [
        ([3, 2, 1], "decreasing", 0.0, True),
        ([3, 3.05, 1], "decreasing", 0.02, True),  # +1.7% < 2%
        ([3, 3.09, 1], "decreasing", 0.02, False),  # +3%
        ([1, 2, 2], "increasing", 0.0, True),
        ([1, 0.99, 2], "increasing", 0.02, True),
        ([1, 0.97, 2], "increasing", 0.02, False),
        ([1], "increasing", 0.02, None),
        ([1, float("nan")], "decreasing", 0.02, None),
    ],
)
def test_is_monotone(values, direction, tol, want):
    assert is_monotone(values, direction, tol) is want


def test_is_monotone_matches_brute_force_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.uniform(0.5, 2, size=rng.integers(2, 7))
        tol = float(rng.choice([0.0, 0.02, 0.1]))
        brute = all(v[i + 1] <= v[i] * (1 + tol) for i in range(len(v) - 1))  # v > 0
        assert is_monotone(v, "decreasing", tol) is brute
    with pytest.raises(ValueError, match="direction"):
        is_monotone([1, 2], "up")
    with pytest.raises(ValueError, match="tol"):
        is_monotone([1, 2], "increasing", -1)


def _summary_rows(text: str, section: str) -> list[dict]:
    block = text.split(f"## {section}")[1].split("\n## ")[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    return [
        dict(zip(head, [c.strip() for c in ln.strip("|").split("|")], strict=True))
        for ln in lines[2:]
    ]


def test_summary_monotonicity_flags():
    df = pd.concat(
        [
            train_frame("mono"),
            train_frame("bump10", bump=0.10),  # PFC1 rises 10% at layer 2
            train_frame("bump1", bump=0.01),  # within the 2% tolerance
            train_frame("pfc3down", pfc3_decreasing=True),
        ]
    )
    tab = summarize_train(df).set_index("run_id")

    def flag(run, m, t=tab):
        return summary._fmt(t.loc[run, f"{m}_monotone"])  # "yes" / "no" / "n/a"

    assert [flag("mono", m) for m in (PFC1, PFC2, PFC3)] == ["yes"] * 3
    assert flag("bump10", PFC1) == "no"
    assert flag("bump1", PFC1) == "yes"
    assert flag("bump1", PFC1, summarize_train(df, tol=0.0).set_index("run_id")) == "no"
    assert flag("pfc3down", PFC3) == "no"
    assert flag("pfc3down", PFC1) == "yes"
    # final accuracies, effective depth, straightness, geodesic error (mean of 0.01*l, l=0..3)
    assert tab.loc["mono", TRAIN_ACC] == pytest.approx(0.92)
    assert tab.loc["mono", TEST_ACC] == pytest.approx(0.82)
    assert tab.loc["mono", EFFECTIVE_DEPTH] == 2
    assert tab.loc["mono", STRAIGHTNESS] == pytest.approx(0.9)
    assert tab.loc["mono", f"geo_err_{PFC2}"] == pytest.approx(0.015)

    text = summary.render_summary(df)
    rows = {r["run_id"]: r for r in _summary_rows(text, "Training runs")}
    assert rows["mono"]["PFC1 ↓ monotone"] == "yes"
    assert rows["bump10"]["PFC1 ↓ monotone"] == "no"
    assert rows["bump1"]["PFC1 ↓ monotone"] == "yes"
    assert rows["pfc3down"]["PFC3 ↑ monotone"] == "no"
    assert rows["pfc3down"]["PFC2 ↓ monotone"] == "yes"
    assert "4 runs: 4 training, 0 surrogate." in text
    assert "at most 2% of the previous layer's value" in text


def test_geodesic_error_from_curve_when_err_rows_missing():
    df = train_frame("a")
    df = df.loc[~df["metric"].isin(GEODESIC_ERR_METRICS)]
    tab = summarize_train(df, curves=train_curves("a")).set_index("run_id")
    # independent: |observed - linear interpolation of the straight curve at r_l|
    prof = pfc_profile(4, 2)[PFC2]
    rel = np.sqrt(np.arange(4) / 3)
    pred = prof[0] + rel * (prof[-1] - prof[0])
    assert tab.loc["a", f"geo_err_{PFC2}"] == pytest.approx(
        np.mean(np.abs(np.array(prof) - pred)), rel=1e-6
    )


def test_summarize_surrogate_one_row_per_run_model_lambda():
    df = surrogate_frame("g", LAMS, models=("data", "mufm", "ufm"))
    tab = summarize_surrogate(df)
    assert len(tab) == 2 * len(LAMS)
    row = tab.loc[(tab["model"] == "mufm") & (tab["lam"] == 0.005)].iloc[0]
    assert row[PFC1] == pytest.approx(mufm_value(PFC1, 0.005, "mufm"))  # last step, not 123
    assert row[f"data_{PFC1}"] == pytest.approx(2.0)
    assert row["lam_ratio"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- acceptance


def test_acceptance_1_four_lambda_sweep(tmp_path, capsys):
    """`launch.py -m task=mufm lam.lam=0.0005,0.001,0.005,0.02 hydra.sweep.dir=out/s`."""
    sweep = tmp_path / "out" / "s"
    sweep.mkdir(parents=True)
    write_multirun_yaml(sweep, ["task=mufm", "lam.lam=0.0005,0.001,0.005,0.02", "logger=none"])
    for k, lam in enumerate(LAMS):
        write_job(sweep / str(k), surrogate_frame(f"s_{k}", (lam,)), config={"lam": {"lam": lam}})
    figs = tmp_path / "out" / "figs"
    rc = figures.main([str(sweep), "-o", str(figs), "--dpi", "40"])
    out = capsys.readouterr().out
    assert rc == 0
    for ext in ("png", "pdf"):
        assert (figs / f"fig5_lambda_tradeoff.{ext}").stat().st_size > 1000
    _png_nonempty(figs / "fig5_lambda_tradeoff.png")
    assert "fig2: skipped" in out and "fig3: skipped" in out and "fig5: drawn" in out
    text = (figs / "summary.md").read_text()
    assert "4 runs: 0 training, 4 surrogate." in text
    rows = _summary_rows(text, "Surrogate runs")
    assert sorted(r["run_id"] for r in rows) == [f"s_{k}" for k in range(4)]


def test_acceptance_2_digits_train_and_paper_fig4(tmp_path):
    """Default digits run + `experiment=paper_fig4`: Fig. 2, 3 and 4 are drawn."""
    write_job(
        tmp_path / "outputs" / "digits",
        train_frame("digits_run"),
        curves=train_curves("digits_run"),
    )
    write_job(
        tmp_path / "outputs" / "fig4",
        surrogate_frame("fig4_run", (0.001,), models=("data", "mufm", "ufm")),
    )
    agg_file = tmp_path / "all.parquet"
    assert agg_mod.main([str(tmp_path / "outputs"), "-o", str(agg_file)]) == 0
    figs = tmp_path / "figs"
    assert figures.main([str(agg_file), "-o", str(figs), "--dpi", "40"]) == 0
    for stem in (
        "fig2_training_curves",
        "fig3_depth_profile",
        "fig4_surrogate_bars",
        "fig_paths_straightness",
    ):
        for ext in ("png", "pdf"):
            assert (figs / f"{stem}.{ext}").exists()
        _png_nonempty(figs / f"{stem}.png")
    assert not (figs / "fig5_lambda_tradeoff.png").exists()
    text = (figs / "summary.md").read_text()
    assert "fig5: skipped" in text and "2 runs: 1 training, 1 surrogate." in text


def test_acceptance_3_failed_job_named_and_rest_drawn(tmp_path, capsys):
    sweep = tmp_path / "s"
    write_job(sweep / "0", train_frame("a", seed=0), curves=train_curves("a", seed=0))
    write_job(sweep / "1", train_frame("b", seed=1, epochs=(0,)), status="diverged", done=False)
    write_job(sweep / "2", train_frame("c", seed=2), curves=train_curves("c", seed=2))
    figs = tmp_path / "figs"
    assert figures.main([str(sweep), "-o", str(figs), "--dpi", "40", "--formats", "png"]) == 0
    err = capsys.readouterr().err
    assert str(sweep / "1") in err and "diverged" in err
    text = (figs / "summary.md").read_text()
    assert str(sweep / "1") in text.split("## Unfinished or failed jobs")[1]
    assert {r["run_id"] for r in _summary_rows(text, "Training runs")} == {"a", "c"}
    _png_nonempty(figs / "fig2_training_curves.png")
    _png_nonempty(figs / "fig3_depth_profile.png")


def test_make_figures_rejects_bad_arguments(tmp_path):
    df = train_frame("a")
    with pytest.raises(ValueError, match="tol"):
        figures.make_figures(df, tmp_path, tol=-0.1)
    with pytest.raises(ValueError, match="jpeg"):
        figures.make_figures(df, tmp_path, formats=("jpeg",))


def test_seed_clashes_flag_runs_averaged_as_seeds():
    from pfc_sweeps.results.tidy import seed_clashes

    assert seed_clashes(pd.concat([train_frame("a", seed=0), train_frame("b", seed=1)])) == []
    notes = seed_clashes(
        pd.concat([train_frame("a"), train_frame("b"), train_frame("c", dataset="mnist")])
    )
    assert len(notes) == 1 and "['a', 'b']" in notes[0]
    sur = pd.concat([surrogate_frame("x", LAMS), surrogate_frame("y", LAMS[:1])])
    (note,) = seed_clashes(sur)
    assert "['x', 'y']" in note and "λ=0.0005" in note


def test_figures_cli_when_no_figure_is_supported(tmp_path, capsys):
    df = train_frame("a")
    write_job(tmp_path / "s" / "0", df.loc[df["metric"].isin([LR, TRAIN_ACC])])
    assert figures.main([str(tmp_path / "s"), "-o", str(tmp_path / "figs")]) == 1
    assert "supports none" in capsys.readouterr().err
    text = (tmp_path / "figs" / "summary.md").read_text()
    assert "fig2: skipped: no per-layer PFC rows" in text
    assert list((tmp_path / "figs").glob("*.png")) == []


def test_normalize_rejects_a_missing_seed(tmp_path):
    """Every row carries its run's seed (the sink fills it); a table without one is broken."""
    df = surrogate_frame("a", (0.001,), seed=7).astype({"seed": "Int64"})
    df.loc[df["model"] == "data", "seed"] = pd.NA
    with pytest.raises(SchemaError, match=r"src\.parquet: column 'seed'"):
        discovery.normalize_table(df, source="src.parquet")
    # the data rows (lam = lam_w = NaN) take part in Fig. 4's data bars
    fig = figures.fig4_surrogate_bars(surrogate_frame("a", (0.001,), seed=7))
    assert len(_bars(fig.axes[0])) == 6


def test_fig5_one_curve_per_setting_when_losses_differ():
    """Sweeps with different losses are drawn as separate curves (one legend entry each)."""
    mse = surrogate_frame("m", LAMS)
    ce = surrogate_frame("c", LAMS).assign(loss="ce")
    ce["value"] = np.where(ce["model"] == "mufm", ce["value"] + 1.0, ce["value"])
    fig = figures.fig5_lambda_tradeoff(pd.concat([mse, ce]), metrics=(PFC1,))
    curves = [c for c in _data_lines(fig.axes[0]) if c.get_linestyle() != "--"]  # not data X
    curves = sorted(curves, key=lambda c: c.get_ydata()[0])
    assert len(curves) == 2
    want = np.array([mufm_value(PFC1, lam, "mufm") for lam in LAMS])
    np.testing.assert_allclose(curves[0].get_ydata(), want)
    np.testing.assert_allclose(curves[1].get_ydata(), want + 1.0)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(labels) == ["ce", "mse"]


# ------------------------------------------------------------- bad inputs (issue 21)
def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _write_old_job(job_dir: Path, df: pd.DataFrame, monkeypatch) -> None:
    """A job written by an older schema version (write_table stamps the module's version)."""
    with monkeypatch.context() as m:
        m.setattr(schema_mod, "SCHEMA_VERSION", schema_mod.SCHEMA_VERSION - 1)
        write_job(job_dir, df)


BAD_INPUTS = ["output_file_or_folder", "output_under_a_file", "output_not_writable",
              "input_missing", "mixed_versions"]  # fmt: skip


@pytest.mark.parametrize("command", ["aggregate", "figures"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(
    tmp_path, capsys, monkeypatch, command, case
):
    sweep, f, folder = tmp_path / "s", tmp_path / "f", tmp_path / "d"
    write_job(sweep / "0", train_frame("a"))
    f.write_text("mine")
    folder.mkdir()
    out = tmp_path / ("all.parquet" if command == "aggregate" else "figs")
    inputs = [sweep]
    if case == "output_file_or_folder":
        out = folder if command == "aggregate" else f
        want = (
            f"{out} is a folder" if command == "aggregate" else f"{f} is a file; -o takes a folder"
        )
    elif case == "output_under_a_file":
        out = f / "x"
        want = f"{f} is a file, so {out} cannot be written"
    elif case == "output_not_writable":
        monkeypatch.setattr(discovery.os, "access", lambda *a: False)
        want = f"{tmp_path} is not writable, so {out} cannot be written"
    elif case == "input_missing":
        inputs.append(tmp_path / "nope")
        want = f"path(s) do not exist: {tmp_path / 'nope'}"
    else:
        _write_old_job(sweep / "1", train_frame("b", seed=1), monkeypatch)
        v = schema_mod.SCHEMA_VERSION
        want = (
            f"mixed schema versions: {v} (1 input(s), e.g. {sweep / '0'}), {v - 1} (1 input(s), "
            f"e.g. {sweep / '1'}); aggregate each version separately"
        )
    before = _files(tmp_path)
    main = agg_mod.main if command == "aggregate" else figures.main
    assert main([*map(str, inputs), "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {want}"), err
    assert _files(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    write_job(tmp_path / "s" / "0", train_frame("a"))
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    for main, out in [(agg_mod.main, ro / "all.parquet"), (figures.main, ro / "figs")]:
        assert main([str(tmp_path / "s"), "-o", str(out)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"error: {ro} is not writable, so {out} cannot be written; choose another -o"
        ]
    assert list(ro.iterdir()) == []


def test_aggregated_file_and_jobs_of_another_schema_version_do_not_mix(tmp_path, monkeypatch):
    _write_old_job(tmp_path / "old" / "0", train_frame("a"), monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(schema_mod, "SCHEMA_VERSION", schema_mod.SCHEMA_VERSION - 1)
        old = agg_mod.write_aggregate(aggregate([tmp_path / "old"]), tmp_path / "old.parquet")
    write_job(tmp_path / "new" / "0", train_frame("b", seed=1))
    assert load([old]).schema_version == schema_mod.SCHEMA_VERSION - 1
    with pytest.raises(SchemaError, match=r"^mixed schema versions: "):
        load([old, tmp_path / "new"])
