"""The paper's Figures 2-5 (and path-straightness plots) from the tidy results table (issue 5).

Every ``fig*`` function takes a tidy results table (:data:`pfc_sweeps.results.schema.COLUMNS`, e.g.
``analysis.aggregate.load(...).table``) and returns a :class:`matplotlib.figure.Figure` drawn on the
Agg canvas; it raises :class:`FigureDataError` (a ValueError) when the table holds no data
for it. Runs that differ only by ``seed`` are averaged: the line is the mean and the band
(or error bar) its 95% Student-t confidence interval (:func:`pfc_sweeps.results.tidy.ci95`).

- :func:`fig2_training_curves`: PFC metrics against epoch, one line per layer coloured by depth
  (viridis, layer 0 = input features), one panel per (metric, data set); PFC1 on a log axis.
- :func:`fig3_depth_profile`: each PFC metric at the last epoch against the relative position
  r_l, observed layers as green points joined by a line, the geodesic prediction (the
  curves table, ``curves.parquet``) as a blue curve.
- :func:`fig4_surrogate_bars`: PFC1-3 of the data, MUFM and UFM at the last GD step as bars;
  panel (a) data + MUFM on a linear axis, panel (b) data + UFM on a log axis.
- :func:`fig5_lambda_tradeoff`: MUFM's PFC1-3 and alignment against λ/λ_W (λ-grid jobs and
  one-λ-per-job sweeps alike), with the data's PFC metrics as dashed red lines.
- :func:`fig_paths`: straightness and energy ratio of the forward path against epoch.

Command line (writes PNG + PDF of every figure the data supports, and summary.md)::

    python -m analysis.figures <sweep dirs, job dirs or all.parquet...> -o figs/
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pfc_sweeps.results.schema import (
    ALIGNMENT,
    CURVES_FILE,
    DATA_MODEL,
    ENERGY_RATIO,
    PFC_METRICS,
    RUN_LAYER,
    STRAIGHTNESS,
    SURROGATE_MODELS,
    empty_frame,
)
from pfc_sweeps.results.tidy import (
    LOG_METRICS,
    METRIC_LABELS,
    add_condition,
    at_last_epoch,
    ci95,
    condition_order,
    surrogate_rows,
    train_rows,
)

PAPER_LAM = 0.001
"""λ of the paper's Fig. 4 setting (section IV-B); Fig. 4 uses the λ nearest to it."""

OBSERVED_COLOR = "tab:green"
GEODESIC_COLOR = "tab:blue"
DATA_COLOR = "tab:red"
MODEL_COLORS = {DATA_MODEL: DATA_COLOR, "mufm": "tab:blue", "ufm": "tab:purple"}
MODEL_NAMES = {DATA_MODEL: "data X", "mufm": "MUFM", "ufm": "UFM"}
_PANEL_W, _PANEL_H = 3.4, 2.6


class FigureDataError(ValueError):
    """The table holds no data for this figure (the message says what is missing)."""


def _new_figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(_PANEL_W * ncols, 5.5), _PANEL_H * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _errorbar(groups: pd.DataFrame, keys: Sequence[str]) -> Callable | None:
    """ci95 when some group of ``keys`` holds more than one row (several seeds), else None."""
    if groups.empty:
        return None
    return ci95 if groups.groupby(list(keys), dropna=False).size().max() > 1 else None


def _per_layer(tr: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    rows = tr.loc[(tr["layer"] >= 0) & tr["metric"].isin(metrics)]
    if (rows["split"] == "train").any():
        rows = rows.loc[rows["split"] == "train"]
    return rows


def _layer_legend(ax, palette: dict[int, tuple]) -> None:
    handles = [Line2D([], [], color=c, lw=2) for c in palette.values()]
    labels = [f"layer{layer}" for layer in palette]
    ax.legend(
        handles,
        labels,
        fontsize="x-small",
        ncol=2 if len(labels) > 8 else 1,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )


# ----------------------------------------------------------------------------- Fig. 2


def fig2_training_curves(df: pd.DataFrame, metrics: Sequence[str] = PFC_METRICS) -> Figure:
    """Fig. 2: each PFC metric against epoch, one line per layer, one panel per (metric, data set).

    Rows are metrics, columns conditions (data set, plus arch/loss where they vary); lines
    are coloured by layer index (viridis, dark = input). With several seeds: mean and 95% band.
    """
    rows = add_condition(_per_layer(train_rows(df), metrics))
    if rows.empty:
        raise FigureDataError("no per-layer PFC rows of training runs (model net, layer >= 0)")
    metrics = [m for m in metrics if (rows["metric"] == m).any()]
    conds = condition_order(rows)
    fig, axes = _new_figure(len(metrics), len(conds))
    for j, cond in enumerate(conds):
        sub_c = rows.loc[rows["condition"] == cond]
        layers = sorted(sub_c["layer"].unique())
        palette = dict(zip(layers, sns.color_palette("viridis", len(layers)), strict=True))
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            sub = sub_c.loc[sub_c["metric"] == m]
            eb = _errorbar(sub, ["layer", "epoch"])
            sns.lineplot(
                data=sub,
                x="epoch",
                y="value",
                hue="layer",
                palette=palette,
                estimator="mean" if eb else None,
                errorbar=eb,
                legend=False,
                ax=ax,
            )
            if m in LOG_METRICS:
                ax.set_yscale("log")
            ax.set_xlabel("epoch" if i == len(metrics) - 1 else "")
            ax.set_ylabel(METRIC_LABELS.get(m, m) if j == 0 else "")
            if i == 0:
                ax.set_title(cond)
                _layer_legend(ax, palette)
    fig.suptitle("PFC metrics of every layer during training (Fig. 2)", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- Fig. 3


def _observed(ax, o: pd.DataFrame) -> None:
    """Per layer: mean over seeds of (r_l, value) joined by a line, 95% CI bars with seeds."""
    g = o.groupby("layer").agg(x=("rel_pos", "mean"), y=("value", "mean"), n=("value", "size"))
    ax.plot(g["x"], g["y"], "o-", color=OBSERVED_COLOR, ms=4, label="observed (layers)")
    if g["n"].max() > 1:
        ci = o.groupby("layer")["value"].apply(ci95)
        lo = np.array([c[0] for c in ci])
        hi = np.array([c[1] for c in ci])
        y = g["y"].to_numpy()
        ax.errorbar(g["x"], y, yerr=[y - lo, hi - y], fmt="none", ecolor=OBSERVED_COLOR)


def _predicted(ax, c: pd.DataFrame) -> None:
    """The geodesic curve (mean over seeds, 95% band with seeds)."""
    if c.empty:
        return
    eb = _errorbar(c, ["t"])
    sns.lineplot(
        data=c,
        x="t",
        y="value",
        color=GEODESIC_COLOR,
        estimator="mean" if eb else None,
        errorbar=eb,
        label="geodesic prediction",
        legend=False,
        ax=ax,
    )


def fig3_depth_profile(
    df: pd.DataFrame, metrics: Sequence[str] = PFC_METRICS, curves: pd.DataFrame | None = None
) -> Figure:
    """Fig. 3: each PFC metric at the last epoch against relative depth, with the geodesic curve.

    Observed: per layer, mean over seeds of (r_l, metric) as green points joined by a line
    (95% CI error bars with several seeds). Predicted: ``curves`` (the curves table) at each
    run's last epoch holding them, as a blue curve against t.
    """
    tr = add_condition(train_rows(df))
    obs = at_last_epoch(_per_layer(tr, metrics), by=("run_id",))
    if obs.empty:
        raise FigureDataError("no per-layer PFC rows of training runs (model net, layer >= 0)")
    obs = obs.copy()
    depth = obs.groupby("run_id")["layer"].transform("max").clip(lower=1)
    obs["rel_pos"] = obs["rel_pos"].fillna(obs["layer"] / depth)
    curves = empty_frame(CURVES_FILE) if curves is None else curves
    condition = tr.groupby("run_id")["condition"].first()
    curves = at_last_epoch(curves.loc[curves["run_id"].isin(condition.index)], by=("run_id",))
    curves = curves.assign(condition=curves["run_id"].map(condition))
    metrics = [m for m in metrics if (obs["metric"] == m).any()]
    conds = condition_order(obs)
    fig, axes = _new_figure(len(metrics), len(conds))
    for j, cond in enumerate(conds):
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            _observed(ax, obs.loc[(obs["condition"] == cond) & (obs["metric"] == m)])
            _predicted(ax, curves.loc[(curves["condition"] == cond) & (curves["metric"] == m)])
            if m in LOG_METRICS:
                ax.set_yscale("log")
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel(r"relative position $r_l$" if i == len(metrics) - 1 else "")
            ax.set_ylabel(METRIC_LABELS.get(m, m) if j == 0 else "")
            if i == 0:
                ax.set_title(cond)
    axes[0, 0].legend(fontsize="x-small", frameon=False)
    fig.suptitle("PFC metrics across depth at the last epoch (Fig. 3)", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- Fig. 4


def _nearest(values: Sequence[float], target: float) -> float:
    vals = np.asarray(values, dtype=np.float64)
    if target > 0 and (vals > 0).all():
        return float(vals[np.argmin(np.abs(np.log(vals) - math.log(target)))])
    return float(vals[np.argmin(np.abs(vals - target))])


def _setting(df: pd.DataFrame) -> pd.Series:
    """Label of (loss, λ_W) where they vary between surrogate runs; "" when they don't."""
    parts = []
    if df["loss"].nunique() > 1:
        parts.append(df["loss"].astype("str"))
    if df["lam_w"].nunique(dropna=False) > 1:
        parts.append("λ_W=" + df["lam_w"].map("{:g}".format))
    if not parts:
        return pd.Series("", index=df.index, dtype="str")
    label = parts[0]
    for p in parts[1:]:
        label = label + ", " + p
    return label


def _fig4_bars(s: pd.DataFrame, model: str, target: float) -> tuple[pd.DataFrame, float]:
    """Bars of one Fig. 4 panel: ``model`` at the λ nearest ``target`` and the data of the same
    runs, at the last step; returns (rows run_id/metric/value/model/label, the λ used)."""
    sol = s.loc[s["model"] == model]
    lams = sol["lam"].dropna().unique()
    chosen = _nearest(lams, target) if len(lams) else math.nan
    if len(lams):
        sol = sol.loc[sol["lam"] == chosen]
    sol = at_last_epoch(sol, by=("run_id", "lam"))
    data = s.loc[(s["model"] == DATA_MODEL) & s["run_id"].isin(sol["run_id"].unique())]
    data = at_last_epoch(data, by=("run_id",))
    data = data.groupby(["run_id", "metric"], as_index=False)["value"].mean()
    bars = pd.concat(
        [data.assign(model=DATA_MODEL), sol[["run_id", "metric", "value"]].assign(model=model)],
        ignore_index=True,
    )
    return bars.assign(label=bars["metric"].map(METRIC_LABELS)), chosen


def _fig4_panel(ax, bars: pd.DataFrame, model: str, chosen: float, setting: str) -> None:
    hue_order = [h for h in (DATA_MODEL, model) if (bars["model"] == h).any()]
    sns.barplot(
        data=bars,
        x="label",
        y="value",
        hue="model",
        order=[METRIC_LABELS[m] for m in PFC_METRICS],
        hue_order=hue_order,
        palette=MODEL_COLORS,
        errorbar=_errorbar(bars, ["label", "model"]),
        ax=ax,
    )
    ax.set_xlabel("")
    ax.set_xticks(ax.get_xticks(), ["PFC1", "PFC2", "PFC3"])
    ax.set_ylabel("metric value" + (" (log scale)" if model == "ufm" else ""))
    if model == "ufm":
        ax.set_yscale("log")
    title = f"{'(a)' if model == 'mufm' else '(b)'} {MODEL_NAMES[model]}"
    if math.isfinite(chosen):
        title += f", λ={chosen:g}"
    if setting:
        title += f"\n{setting}"
    ax.set_title(title, fontsize="medium")
    handles, _ = ax.get_legend_handles_labels()
    labels = [MODEL_NAMES[h] for h in hue_order]
    ax.legend(
        handles, labels, fontsize="x-small", frameon=False, loc="upper left", bbox_to_anchor=(1, 1)
    )


def fig4_surrogate_bars(df: pd.DataFrame, lam: float | None = None) -> Figure:
    """Fig. 4: PFC1-3 of the data, MUFM and UFM at the last GD step, as bars.

    Panel (a): data and MUFM, linear axis. Panel (b): data and UFM, log axis. One panel per
    solution model present (a row per (loss, λ_W) setting where those vary). Each model uses
    the λ nearest to ``lam`` (default: the paper's :data:`PAPER_LAM`, log distance) among its
    rows. The data bars come from the same runs (model "data", last step).
    Seeds: bar = mean, error bar = 95% CI.
    """
    target = PAPER_LAM if lam is None else float(lam)
    sur = surrogate_rows(df)
    sur = sur.loc[sur["metric"].isin(PFC_METRICS)]
    models = [m for m in SURROGATE_MODELS if (sur["model"] == m).any()]
    if not models:
        raise FigureDataError("no surrogate solution rows (model mufm or ufm) with PFC metrics")
    sur = sur.assign(setting=_setting(sur))
    settings = sorted(sur["setting"].unique())
    fig, axes = _new_figure(len(settings), len(models))
    for i, setting in enumerate(settings):
        s = sur.loc[sur["setting"] == setting]
        for j, model in enumerate(models):
            if not (s["model"] == model).any():
                axes[i, j].set_axis_off()
                continue
            bars, chosen = _fig4_bars(s, model, target)
            _fig4_panel(axes[i, j], bars, model, chosen, setting)
    fig.suptitle(
        "MUFM vs UFM at the last step (Fig. 4)\n"
        + ", ".join(METRIC_LABELS[m].replace(": ", " = ") for m in PFC_METRICS),
        fontsize="small",
    )
    return fig


# ----------------------------------------------------------------------------- Fig. 5


def _lambda_axis(mufm: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``mufm`` with its setting and x = λ/λ_W (λ where λ_W is missing or 0), and x's label."""
    mufm = mufm.assign(setting=_setting(mufm))
    if mufm["lam_w"].notna().all() and (mufm["lam_w"] > 0).all():
        return mufm.assign(x=(mufm["lam"] / mufm["lam_w"]).round(12)), r"$\lambda/\lambda_W$"
    return mufm.assign(x=mufm["lam"]), r"$\lambda$"


def fig5_lambda_tradeoff(
    df: pd.DataFrame, metrics: Sequence[str] = (*PFC_METRICS, ALIGNMENT)
) -> Figure:
    """Fig. 5: MUFM's metrics at the last GD step against λ/λ_W.

    One point per λ (mean over seeds with 95% band), whether the λ grid lives in one job or
    one λ per job. The data's PFC metric (model "data", mean over runs) is drawn as a dashed red
    line. One line per (loss, λ_W) setting where those vary. Needs at least 2 distinct λ.
    """
    sur = surrogate_rows(df)
    mufm = sur.loc[(sur["model"] == "mufm") & sur["metric"].isin(metrics)]
    mufm = mufm.loc[mufm["lam"].notna()]
    if mufm["lam"].nunique() < 2:
        raise FigureDataError(
            f"needs MUFM rows at >= 2 distinct λ values, found {mufm['lam'].nunique()}"
        )
    mufm, xlabel = _lambda_axis(at_last_epoch(mufm, by=("run_id", "lam")))
    runs = mufm["run_id"].unique()
    data = sur.loc[(sur["model"] == DATA_MODEL) & sur["run_id"].isin(runs)]
    data = at_last_epoch(data, by=("run_id",))
    metrics = [m for m in metrics if (mufm["metric"] == m).any()]
    settings = sorted(mufm["setting"].unique())
    hue = "setting" if len(settings) > 1 else None
    xs = mufm["x"].to_numpy()
    log_x = bool((xs > 0).all() and xs.max() / xs.min() >= 10)
    fig, axes = _new_figure(1, len(metrics))
    for j, m in enumerate(metrics):
        ax = axes[0, j]
        sub = mufm.loc[mufm["metric"] == m]
        eb = _errorbar(sub, ["setting", "x"])
        sns.lineplot(
            data=sub,
            x="x",
            y="value",
            hue=hue,
            hue_order=settings if hue else None,
            color=MODEL_COLORS["mufm"] if hue is None else None,
            marker="o",
            ms=4,
            estimator="mean" if eb else None,
            errorbar=eb,
            legend=j == 0 and hue is not None,
            ax=ax,
            # a label next to hue= clashes with seaborn's legend entries
            **({"label": "MUFM"} if hue is None else {}),
        )
        d = data.loc[data["metric"] == m, "value"]
        if len(d):
            ax.axhline(float(d.mean()), color=DATA_COLOR, ls="--", lw=1, label="data X")
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        if j == 0 and hue is None:
            ax.legend(fontsize="x-small", frameon=False)
    fig.suptitle("MUFM trade-off between the simplex ETF and the data (Fig. 5)", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- extra


def fig_paths(df: pd.DataFrame, metrics: Sequence[str] = (STRAIGHTNESS, ENERGY_RATIO)) -> Figure:
    """Straightness and energy ratio of the forward path ("beyond the paper") against
    epoch, one line per condition (mean over seeds, 95% band); dotted line at the ideal 1."""
    tr = train_rows(df)
    rows = tr.loc[tr["metric"].isin(metrics) & (tr["layer"] == RUN_LAYER)]
    if rows.empty:
        raise FigureDataError(f"no run-level {list(metrics)} rows of training runs")
    rows = add_condition(rows)
    metrics = [m for m in metrics if (rows["metric"] == m).any()]
    conds = condition_order(rows)
    fig, axes = _new_figure(1, len(metrics))
    for j, m in enumerate(metrics):
        ax = axes[0, j]
        sub = rows.loc[rows["metric"] == m]
        eb = _errorbar(sub, ["condition", "epoch"])
        sns.lineplot(
            data=sub,
            x="epoch",
            y="value",
            hue="condition",
            hue_order=conds,
            marker="o",
            ms=3,
            estimator="mean" if eb else None,
            errorbar=eb,
            legend=j == 0,
            ax=ax,
        )
        ax.axhline(1.0, color="0.5", ls=":", lw=1)
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.set_xlabel("epoch")
    fig.suptitle(
        "How straight is the forward path? (dotted: 1 = straight paths / equal steps)",
        fontsize="medium",
    )
    return fig
