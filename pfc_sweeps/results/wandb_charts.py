"""The charts, figures and tables a W&B run gets (used by :class:`~pfc_sweeps.results.loggers.WandbLogger`).

Every function takes tidy rows (:data:`pfc_sweeps.results.schema.COLUMNS`) and, for the geodesic
prediction, curves (``t``, ``metric`` in {pfc1, pfc2, pfc3}, ``value``), and returns W&B
objects keyed by their history key:

- ``charts/<metric>_by_layer``: PFC1-3 against epoch, one line per layer (paper Fig. 2);
- ``depth_profile/<metric>``: PFC1-3 against the relative depth r_l, the observed layers
  and the geodesic prediction as two series (paper Fig. 3);
- ``figures/fig2_training_curves``, ``figures/fig3_depth_profile``: the run's own figures,
  drawn by :mod:`analysis.figures`;
- ``tables/final_by_lam``: a surrogate job's metrics at its last step, one row per (model, λ).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pandas as pd

from pfc_sweeps.results.schema import PFC_METRICS, RUN_LAYER

__all__ = ["depth_profiles", "end_of_job", "line_series_by_layer", "table", "wide_results"]

log = logging.getLogger(__name__)


def _wandb() -> Any:
    import wandb

    return wandb


def table(df: pd.DataFrame) -> Any:
    """A ``wandb.Table`` of ``df`` (index dropped)."""
    return _wandb().Table(dataframe=df.reset_index(drop=True))


def wide_results(rows: pd.DataFrame) -> pd.DataFrame:
    """Every row of the tidy table, one row per (epoch, layer, model, λ), a column per metric.

    ``rel_pos`` is the layer's relative depth at that epoch; run-level scalars are the rows
    of layer = RUN_LAYER. Wide, so that a long run fits W&B's limit on a logged table.
    """
    keys = ["epoch", "layer", "model", "lam"]
    df = rows.assign(lam=rows["lam"].fillna(-1.0))
    values = df.pivot_table(index=keys, columns="metric", values="value", aggfunc="first")
    rel = df.groupby(keys)["rel_pos"].first().rename("rel_pos")
    wide = values.join(rel).reset_index()
    wide["lam"] = wide["lam"].where(wide["lam"] >= 0)
    wide.columns.name = None
    return wide[[*keys, "rel_pos", *sorted(values.columns)]]


def line_series_by_layer(rows: pd.DataFrame) -> dict[str, Any]:
    """``charts/<metric>_by_layer``: each PFC metric against epoch, one line per layer."""
    plot = _wandb().plot
    out: dict[str, Any] = {}
    per_layer = rows.loc[(rows["layer"] != RUN_LAYER) & rows["metric"].isin(PFC_METRICS)]
    for m in PFC_METRICS:
        sub = per_layer.loc[per_layer["metric"] == m]
        if sub.empty:
            continue
        wide = sub.pivot_table(index="epoch", columns="layer", values="value", aggfunc="mean")
        xs = [wide.index.tolist()] * wide.shape[1]
        ys = [wide[c].tolist() for c in wide.columns]
        keys = [f"layer_{int(c):02d}" for c in wide.columns]
        out[f"charts/{m}_by_layer"] = plot.line_series(
            xs, ys, keys=keys, title=f"{m} of every layer", xname="epoch", split_table=True
        )
    return out


def depth_profiles(layers: pd.DataFrame, curves: pd.DataFrame) -> dict[str, Any]:
    """``depth_profile/<metric>``: observed (r_l, metric) of every layer, and the geodesic curve.

    ``layers``: one epoch's per-layer rows; ``curves``: that epoch's curves (t, metric, value).
    """
    plot = _wandb().plot
    out: dict[str, Any] = {}
    for m in PFC_METRICS:
        obs = layers.loc[layers["metric"] == m].sort_values("layer")
        cur = curves.loc[curves["metric"] == m].sort_values("t")
        if obs.empty or cur.empty or obs["rel_pos"].isna().any():
            continue
        out[f"depth_profile/{m}"] = plot.line_series(
            [obs["rel_pos"].tolist(), cur["t"].tolist()],
            [obs["value"].tolist(), cur["value"].tolist()],
            keys=["observed (layers)", "geodesic prediction"],
            title=f"{m} against relative depth",
            xname="rel_pos",
            split_table=True,
        )
    return out


def _image(fig: Any) -> Any:
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return _wandb().Image(Image.open(buf))


def figures(rows: pd.DataFrame, curves: pd.DataFrame) -> dict[str, Any]:
    """The run's Fig. 2 and Fig. 3 as ``wandb.Image``, drawn by :mod:`analysis.figures`."""
    from pfc_sweeps.results.figures import fig2_training_curves, fig3_depth_profile

    out: dict[str, Any] = {}
    for name, draw in (
        ("fig2_training_curves", lambda: fig2_training_curves(rows)),
        (
            "fig3_depth_profile",
            lambda: fig3_depth_profile(rows, curves=curves if len(curves) else None),
        ),
    ):
        try:
            fig = draw()
        except ValueError as e:  # the table holds no data for this figure
            log.info("no %s for W&B: %s", name, e)
            continue
        except Exception as e:  # a figure must not fail a finished job: say so and go on
            log.warning("could not draw %s for W&B: %s: %s", name, type(e).__name__, e)
            continue
        out[f"figures/{name}"] = _image(fig)
    return out


def end_of_job(rows: pd.DataFrame, curves: pd.DataFrame, *, surrogate: bool) -> dict[str, Any]:
    """Everything logged once at the end of a job (with the ``results`` table by the caller)."""
    if surrogate:
        from pfc_sweeps.results.summary import summarize_surrogate

        final = summarize_surrogate(rows)
        return {"tables/final_by_lam": table(final)} if len(final) else {}
    out = line_series_by_layer(rows)
    per_layer = rows.loc[(rows["layer"] != RUN_LAYER) & rows["metric"].isin(PFC_METRICS)]
    if len(per_layer) and len(curves):
        last = per_layer.loc[per_layer["epoch"] == per_layer["epoch"].max()]
        at = curves.loc[curves["epoch"] == curves["epoch"].max()]
        out.update(depth_profiles(last, at))
    out.update(figures(rows, curves))
    return out
