"""Per-run summary table (``summary.md``) of a results table (issue 5).

Training runs, one row per run, at the run's last metrics epoch:

- final train and test accuracy (metrics ``train_acc`` / ``test_acc`` at their last epoch);
- whether each PFC metric is monotone across layers 0..L (the PFC conjecture, SPEC.md):
  PFC1 and PFC2 non-increasing, PFC3 non-decreasing, within a relative tolerance ``tol``
  (:func:`is_monotone`, default 2%);
- effective depth, straightness and energy ratio (run-level rows, each at the last epoch
  recording it);
- the geodesic prediction error per PFC metric: the mean over layers 0..L of
  ``geodesic_err_pfcK`` = |observed at layer l - geodesic curve at t = r_l| (SPEC.md,
  "Beyond the paper"); when those rows are missing it is computed from the ``geodesic_pfcK``
  curve rows by linear interpolation at r_l.

Surrogate runs, one row per (run, solution model in {mufm, ufm}, λ) at the last GD step:
PFC1-3, alignment, objective and gradient norm of H, and PFC1-3 of the data X (model "data" of
the same run and λ; the run's mean over λ when the data rows carry no matching λ). A batched
λ-grid job therefore gives one row per λ; the header counts distinct runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.tidy import PFC_METRICS, at_last_epoch, surrogate_rows, train_rows

__all__ = [
    "MONOTONE_DIRECTION",
    "is_monotone",
    "markdown_table",
    "render_summary",
    "summarize_surrogate",
    "summarize_train",
    "write_summary",
]

MONOTONE_DIRECTION = {"pfc1": "decreasing", "pfc2": "decreasing", "pfc3": "increasing"}
"""Direction of the PFC conjecture for each metric across depth."""

_RUN_SCALARS = ("effective_depth", "straightness", "energy_ratio")


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
    rows = run.loc[(run["metric"] == metric) & (run["layer"] < 0)]
    if rows.empty:
        return math.nan
    rows = rows.loc[rows["epoch"] == rows["epoch"].max()]
    return float(rows["value"].mean())


def _geodesic_errors(layers: pd.DataFrame, run_last: pd.DataFrame, curves: pd.DataFrame) -> dict:
    out = {}
    for m in PFC_METRICS:
        err = run_last.loc[(run_last["metric"] == f"geodesic_err_{m}") & (run_last["layer"] >= 0)]
        if not err.empty:
            out[f"geo_err_{m}"] = float(err["value"].abs().mean())
            continue
        curve = curves.loc[curves["metric"] == f"geodesic_{m}"]
        if not curve.empty:
            curve = curve.loc[curve["epoch"] == curve["epoch"].max()].sort_values("rel_pos")
            obs = layers.loc[layers["metric"] == m]
            if not obs.empty and obs["rel_pos"].notna().all():
                pred = np.interp(obs["rel_pos"], curve["rel_pos"], curve["value"])
                out[f"geo_err_{m}"] = float(np.abs(obs["value"].to_numpy() - pred).mean())
                continue
        out[f"geo_err_{m}"] = math.nan
    return out


def summarize_train(df: pd.DataFrame, tol: float = 0.02) -> pd.DataFrame:
    """One row per training run (see the module docstring for the columns)."""
    tr = train_rows(df)
    rows = []
    for run_id, run in tr.groupby("run_id", sort=True):
        per_layer = run.loc[(run["layer"] >= 0) & run["metric"].isin(PFC_METRICS)]
        if (per_layer["split"] == "train").any():
            per_layer = per_layer.loc[per_layer["split"] == "train"]
        last = int(per_layer["epoch"].max()) if len(per_layer) else int(run["epoch"].max())
        run_last = run.loc[run["epoch"] == last]
        layers = per_layer.loc[per_layer["epoch"] == last]
        layers = layers.groupby(["metric", "layer"], as_index=False).agg(
            value=("value", "mean"), rel_pos=("rel_pos", "mean")
        )
        first = run.iloc[0]
        row: dict[str, Any] = {
            "run_id": run_id,
            "dataset": first["dataset"],
            "arch": first["arch"],
            "loss": first["loss"],
            "seed": int(first["seed"]),
            "epoch": last,
            "train_acc": _last_value(run, "train_acc"),
            "test_acc": _last_value(run, "test_acc"),
        }
        for m in PFC_METRICS:
            seq = layers.loc[layers["metric"] == m].sort_values("layer")["value"]
            row[f"{m}_monotone"] = is_monotone(seq.to_numpy(), MONOTONE_DIRECTION[m], tol)
        for s in _RUN_SCALARS:
            row[s] = _last_value(run, s)
        curves = run.loc[run["metric"].str.startswith("geodesic_pfc") & (run["layer"] < 0)]
        row.update(_geodesic_errors(layers, run_last, curves))
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
    data = wide.loc[wide["model"] == "data"]
    sol = wide.loc[wide["model"] != "data"].copy()
    for m in PFC_METRICS:
        if m not in data.columns:
            sol[f"data_{m}"] = math.nan
            continue
        by_run = data.groupby("run_id")[m].mean()
        vals = []
        for rid, lam in zip(sol["run_id"], sol["lam"], strict=True):
            hit = data.loc[(data["run_id"] == rid) & (data["lam"] == lam), m]
            vals.append(float(hit.mean()) if len(hit) else float(by_run.get(rid, math.nan)))
        sol[f"data_{m}"] = vals
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
        *PFC_METRICS,
        "alignment",
        "objective",
        "grad_norm",
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
    "train_acc": "train acc",
    "test_acc": "test acc",
    "pfc1_monotone": "PFC1 ↓ monotone",
    "pfc2_monotone": "PFC2 ↓ monotone",
    "pfc3_monotone": "PFC3 ↑ monotone",
    "effective_depth": "eff. depth",
    "energy_ratio": "energy ratio",
    "geo_err_pfc1": "geodesic err PFC1",
    "geo_err_pfc2": "geodesic err PFC2",
    "geo_err_pfc3": "geodesic err PFC3",
}


def render_summary(
    df: pd.DataFrame,
    *,
    tol: float = 0.02,
    problems: Iterable[str] = (),
    figures: dict[str, str] | None = None,
    sources: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The text of ``summary.md``.

    problems: one line per unfinished/failed job; figures: figure name -> "drawn: files" or
    "skipped: reason"; notes: extra warnings listed under "Notes".
    """
    train = summarize_train(df, tol)
    sur = summarize_surrogate(df)
    n_train = train["run_id"].nunique() if len(train) else 0
    n_sur = sur["run_id"].nunique() if len(sur) else 0
    out = ["# pfc-sweeps summary", ""]
    if sources:
        out += [f"Sources: {', '.join(sources)}", ""]
    out += [f"{n_train + n_sur} runs: {n_train} training, {n_sur} surrogate.", ""]
    if len(train):
        out += [
            "## Training runs",
            "",
            "One row per run, at its last metrics epoch. Monotone: PFC1 and PFC2 non-increasing, "
            f"PFC3 non-decreasing over layers 0..L, allowing a step against the direction of at "
            f"most {tol:.0%} of the previous layer's value. Geodesic err: mean over layers of "
            "|observed - geodesic prediction at r_l|. Effective depth: first layer with NCC "
            "error <= epsilon, as recorded by the run (not reached: no layer does).",
            "",
            markdown_table(
                train.assign(
                    effective_depth=train["effective_depth"].map(
                        lambda v: "not reached" if v < 0 else v
                    )
                ),
                _TRAIN_HEADERS,
            ),
            "",
        ]
    if len(sur):
        out += [
            "## Surrogate runs",
            "",
            "One row per (run, model, λ), at the last GD step; data_* are the data X's metrics.",
            "",
            markdown_table(sur, {"lam": "λ", "lam_w": "λ_W", "lam_ratio": "λ/λ_W"}),
            "",
        ]
    problems = list(problems)
    out += ["## Unfinished or failed jobs", ""]
    out += [f"- {p}" for p in problems] if problems else ["none"]
    out.append("")
    if notes:
        out += ["## Notes", ""]
        out += [f"- {n}" for n in notes]
        out.append("")
    if figures:
        out += ["## Figures", ""]
        out += [f"- {name}: {what}" for name, what in figures.items()]
        out.append("")
    return "\n".join(out)


def write_summary(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically (tmp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
