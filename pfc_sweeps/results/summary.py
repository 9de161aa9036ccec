"""Per-run summary table (``summary.md``) of a results table (issue 5).

Training runs, one row per run, at the run's last metrics epoch:

- final train and test accuracy (metrics ``train_acc`` / ``test_acc`` at their last epoch);
- whether each PFC metric is monotone across layers 0..L (the PFC conjecture):
  PFC1 and PFC2 non-increasing, PFC3 non-decreasing, within a relative tolerance ``tol``
  (:func:`is_monotone`, default 2%);
- effective depth, straightness and energy ratio (run-level rows, each at the last epoch
  recording it);
- the geodesic prediction error per PFC metric: the mean over layers 0..L of
  ``geodesic_err_pfcK`` = |observed at layer l - geodesic curve at t = r_l| ("beyond the
  paper": the straight-line path h(t) = (1-t) h_0 + t h_L); when those rows are missing it is
  computed from the run's curve (``curves.parquet``) by linear interpolation at r_l.

Surrogate runs, one row per (run, solution model in {mufm, ufm}, λ) at the last GD step:
PFC1-3, alignment, objective and gradient norm of H, and PFC1-3 of the data X (the run's
model "data" rows, which hold no λ: X does not depend on it). A batched λ-grid job therefore
gives one row per λ; the header counts distinct runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pfc_sweeps.results.schema import (
    CURVES_FILE,
    DATA_MODEL,
    EFFECTIVE_DEPTH,
    ENERGY_RATIO,
    GEODESIC_ERR_METRICS,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    RUN_LAYER,
    STRAIGHTNESS,
    SURROGATE_METRICS,
    TEST_ACC,
    TRAIN_ACC,
    atomic_write_bytes,
    empty_frame,
)
from pfc_sweeps.results.tidy import at_last_epoch, surrogate_rows, train_rows

__all__ = [
    "MONOTONE_DIRECTION",
    "is_monotone",
    "markdown_table",
    "render_summary",
    "summarize_surrogate",
    "summarize_train",
    "write_summary",
]

MONOTONE_DIRECTION = {PFC1: "decreasing", PFC2: "decreasing", PFC3: "increasing"}
"""Direction of the PFC conjecture for each metric across depth."""

_RUN_SCALARS = (EFFECTIVE_DEPTH, STRAIGHTNESS, ENERGY_RATIO)


def is_monotone(values: Sequence[float], direction: str, tol: float = 0.02) -> bool | None:
    """Whether ``values`` (ordered by layer) are monotone in ``direction`` within ``tol``.

    decreasing: every step satisfies v[l+1] <= v[l] + tol * |v[l]|;
    increasing: every step satisfies v[l+1] >= v[l] - tol * |v[l]|.
    So a rise of at most ``tol`` (relative to the previous layer) still counts as decreasing.
    Returns None (not decidable) for fewer than 2 values or any non-finite value.
    """
    if direction not in ("decreasing", "increasing"):
        raise ValueError(f"direction must be 'decreasing' or 'increasing', got {direction!r}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or not np.isfinite(v).all():
        return None
    a, b = v[:-1], v[1:]
    slack = tol * np.abs(a)
    ok = b <= a + slack if direction == "decreasing" else b >= a - slack
    return bool(ok.all())


def _last_value(run: pd.DataFrame, metric: str) -> float:
    """The run-level value of ``metric`` at the last epoch recording it (NaN if never)."""
    rows = run.loc[(run["metric"] == metric) & (run["layer"] == RUN_LAYER)]
    if rows.empty:
        return math.nan
    rows = rows.loc[rows["epoch"] == rows["epoch"].max()]
    return float(rows["value"].mean())


def _geodesic_errors(layers: pd.DataFrame, run_last: pd.DataFrame, curves: pd.DataFrame) -> dict:
    """geo_err_<m>: mean |observed - curve at r_l| over layers, from the geodesic_err rows
    of the last epoch, else from the run's curve (its last epoch, interpolated at r_l)."""
    out = {}
    for m, err_name in zip(PFC_METRICS, GEODESIC_ERR_METRICS, strict=True):
        err = run_last.loc[(run_last["metric"] == err_name) & (run_last["layer"] >= 0)]
        curve = curves.loc[curves["metric"] == m]
        obs = layers.loc[layers["metric"] == m]
        out[f"geo_err_{m}"] = math.nan
        if not err.empty:
            out[f"geo_err_{m}"] = float(err["value"].abs().mean())
        elif len(curve) and len(obs) and obs["rel_pos"].notna().all():
            curve = curve.loc[curve["epoch"] == curve["epoch"].max()].sort_values("t")
            pred = np.interp(obs["rel_pos"], curve["t"], curve["value"])
            out[f"geo_err_{m}"] = float(np.abs(obs["value"].to_numpy() - pred).mean())
    return out


def _last_layers(run: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """(last metrics epoch, its per-layer PFC rows averaged per (metric, layer))."""
    per_layer = run.loc[(run["layer"] >= 0) & run["metric"].isin(PFC_METRICS)]
    if (per_layer["split"] == "train").any():
        per_layer = per_layer.loc[per_layer["split"] == "train"]
    last = int(per_layer["epoch"].max()) if len(per_layer) else int(run["epoch"].max())
    layers = per_layer.loc[per_layer["epoch"] == last]
    layers = layers.groupby(["metric", "layer"], as_index=False).agg(
        value=("value", "mean"), rel_pos=("rel_pos", "mean")
    )
    return last, layers


def summarize_train(
    df: pd.DataFrame, tol: float = 0.02, curves: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per training run (see the module docstring for the columns); ``curves``:
    the runs' geodesic curves (``curves.parquet``), used where geodesic_err rows are absent."""
    tr = train_rows(df)
    curves = curves if curves is not None else empty_frame(CURVES_FILE)
    rows = []
    for run_id, run in tr.groupby("run_id", sort=True):
        last, layers = _last_layers(run)
        first = run.iloc[0]
        row: dict[str, Any] = {
            "run_id": run_id,
            "dataset": first["dataset"],
            "arch": first["arch"],
            "loss": first["loss"],
            "seed": int(first["seed"]),
            "epoch": last,
            TRAIN_ACC: _last_value(run, TRAIN_ACC),
            TEST_ACC: _last_value(run, TEST_ACC),
        }
        for m in PFC_METRICS:
            seq = layers.loc[layers["metric"] == m].sort_values("layer")["value"]
            row[f"{m}_monotone"] = is_monotone(seq.to_numpy(), MONOTONE_DIRECTION[m], tol)
        for s in _RUN_SCALARS:
            row[s] = _last_value(run, s)
        run_curves = curves.loc[curves["run_id"] == run_id]
        row.update(_geodesic_errors(layers, run.loc[run["epoch"] == last], run_curves))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_surrogate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, solution model, λ) of the surrogate runs, at the last GD step."""
    sur = surrogate_rows(df)
    if sur.empty:
        return pd.DataFrame()
    keys = ["run_id", "model", "lam"]
    last = at_last_epoch(sur, by=keys)
    values = last.groupby([*keys, "metric"], dropna=False)["value"].mean().unstack("metric")
    info = last.groupby(keys, dropna=False).agg(
        task=("task", "first"),
        loss=("loss", "first"),
        seed=("seed", "first"),
        lam_w=("lam_w", "first"),
        step=("epoch", "max"),
    )
    wide = info.reset_index().merge(values.reset_index(), on=keys, how="left")
    data = wide.loc[wide["model"] == DATA_MODEL]
    sol = wide.loc[wide["model"] != DATA_MODEL].copy()
    for m in PFC_METRICS:
        by_run = data.groupby("run_id")[m].mean() if m in data.columns else pd.Series(dtype=float)
        sol[f"data_{m}"] = sol["run_id"].map(by_run).astype("float64")
    sol["lam_ratio"] = sol["lam"] / sol["lam_w"]
    cols = [
        "run_id",
        "task",
        "model",
        "loss",
        "seed",
        "lam",
        "lam_w",
        "lam_ratio",
        "step",
        *SURROGATE_METRICS,
        *(f"data_{m}" for m in PFC_METRICS),
    ]
    for c in cols:
        if c not in sol.columns:
            sol[c] = math.nan
    order = ["model", "loss", "lam_w", "lam", "seed", "run_id"]
    return sol[cols].sort_values(order).reset_index(drop=True)


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        if not math.isfinite(float(x)):
            return "–"
        return f"{float(x):.4g}"
    return str(x).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, headers: dict[str, str] | None = None) -> str:
    """A GitHub markdown table of ``df`` (floats to 4 significant digits, booleans yes/no,
    None as n/a, NaN as –)."""
    headers = headers or {}
    cols = list(df.columns)
    head = "| " + " | ".join(headers.get(c, c) for c in cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    body = ["| " + " | ".join(_fmt(v) for v in rec) + " |" for rec in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


_TRAIN_HEADERS = {
    TRAIN_ACC: "train acc",
    TEST_ACC: "test acc",
    f"{PFC1}_monotone": "PFC1 ↓ monotone",
    f"{PFC2}_monotone": "PFC2 ↓ monotone",
    f"{PFC3}_monotone": "PFC3 ↑ monotone",
    EFFECTIVE_DEPTH: "eff. depth",
    ENERGY_RATIO: "energy ratio",
    f"geo_err_{PFC1}": "geodesic err PFC1",
    f"geo_err_{PFC2}": "geodesic err PFC2",
    f"geo_err_{PFC3}": "geodesic err PFC3",
}


def _train_section(train: pd.DataFrame, tol: float) -> list[str]:
    if train.empty:
        return []
    depth = train[EFFECTIVE_DEPTH].map(lambda v: "not reached" if v < 0 else v)
    return [
        "## Training runs",
        "",
        "One row per run, at its last metrics epoch. Monotone: PFC1 and PFC2 non-increasing, "
        f"PFC3 non-decreasing over layers 0..L, allowing a step against the direction of at "
        f"most {tol:.0%} of the previous layer's value. Geodesic err: mean over layers of "
        "|observed - geodesic prediction at r_l|. Effective depth: first layer with NCC "
        "error <= epsilon, as recorded by the run (not reached: no layer does).",
        "",
        markdown_table(train.assign(**{EFFECTIVE_DEPTH: depth}), _TRAIN_HEADERS),
        "",
    ]


def _surrogate_section(sur: pd.DataFrame) -> list[str]:
    if sur.empty:
        return []
    return [
        "## Surrogate runs",
        "",
        "One row per (run, model, λ), at the last GD step; data_* are the data X's metrics.",
        "",
        markdown_table(sur, {"lam": "λ", "lam_w": "λ_W", "lam_ratio": "λ/λ_W"}),
        "",
    ]


def _list_section(title: str, items: Sequence[str], empty: str | None = "none") -> list[str]:
    if not items and empty is None:
        return []
    return [f"## {title}", "", *([f"- {i}" for i in items] or [empty]), ""]


def render_summary(
    df: pd.DataFrame,
    *,
    curves: pd.DataFrame | None = None,
    tol: float = 0.02,
    problems: Iterable[str] = (),
    figures: dict[str, str] | None = None,
    sources: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The text of ``summary.md``.

    curves: the runs' geodesic curves; problems: one line per unfinished/failed job;
    figures: figure name -> "drawn: files" or "skipped: reason"; notes: extra warnings
    listed under "Notes".
    """
    train = summarize_train(df, tol, curves)
    sur = summarize_surrogate(df)
    n_train = train["run_id"].nunique() if len(train) else 0
    n_sur = sur["run_id"].nunique() if len(sur) else 0
    out = ["# pfc-sweeps summary", ""]
    if sources:
        out += [f"Sources: {', '.join(sources)}", ""]
    out += [f"{n_train + n_sur} runs: {n_train} training, {n_sur} surrogate.", ""]
    out += _train_section(train, tol) + _surrogate_section(sur)
    out += _list_section("Unfinished or failed jobs", list(problems))
    out += _list_section("Notes", list(notes), empty=None)
    figs = [f"{name}: {what}" for name, what in (figures or {}).items()]
    out += _list_section("Figures", figs, empty=None)
    return "\n".join(out)


def write_summary(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`pfc_sweeps.results.schema.atomic_write`)."""
    atomic_write_bytes(path, text.encode())
    return Path(path)
