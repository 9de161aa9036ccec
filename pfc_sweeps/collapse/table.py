"""The tables of a :class:`~pfc_sweeps.collapse.core.LayerRunTracker`: every accumulator's
metrics gathered into the long ``(layer, rel_pos, metric, value)`` table and the curves
(column layout: :mod:`pfc_sweeps.results.schema`)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pfc_sweeps.collapse import accumulators as acc
from pfc_sweeps.collapse.metrics import F64
from pfc_sweeps.results.schema import (
    GEODESIC_ERR_METRICS,
    LAST_LAYER_METRICS,
    LAYER_METRICS,
    PATH_METRICS,
    PFC3,
    PFC_METRICS,
    RUN_LAYER,
    TR_SW,
)


def collect(accs: dict, n: int, lm, epsilon: float, transport: bool) -> tuple[dict, ...]:
    """Every accumulator's metrics: (per layer, last layer, run level, curves)."""
    layer_vals = accs["within"].compute(n, lm)  # (S,) each
    last_vals, run_vals, curves = {}, {}, {}
    if "geodesic" in accs:
        geo = accs["geodesic"].compute(n, lm, layer_vals[TR_SW] * n, layer_vals)
        curves = geo.pop("curves")
        layer_vals |= geo
    if "classifier" in accs:
        last_vals |= accs["classifier"].compute(n, lm)
    run_vals |= acc.EffectiveDepth(epsilon).compute(layer_vals[PFC3].cpu().tolist())
    if "path" in accs:
        run_vals |= accs["path"].compute()
    if transport:
        run_vals |= acc.Transport().compute(lm)
    return layer_vals, last_vals, run_vals, curves


def long_table(rel: list[float], layer_vals: dict, last_vals: dict, run_vals: dict) -> pd.DataFrame:
    """Rows in the order of the schema's name lists; one device->host transfer per group."""
    last = len(rel) - 1
    known = {*LAYER_METRICS, *GEODESIC_ERR_METRICS, *LAST_LAYER_METRICS, *PATH_METRICS}
    unknown = sorted({*layer_vals, *last_vals, *run_vals} - known)
    if unknown:  # every metric name lives in pfc_sweeps.results.schema
        raise KeyError(f"metric(s) {unknown} are not in pfc_sweeps.results.schema's name lists")
    names = [m for m in (*LAYER_METRICS, *GEODESIC_ERR_METRICS) if m in layer_vals]
    host = torch.stack([layer_vals[m].to(F64) for m in names]).cpu().tolist() if names else []
    rows = []
    for j, key in enumerate(names):
        rows += [(i, rel[i], key, host[j][i]) for i in range(len(rel))]
    rows += [
        (last, rel[last], m, float(last_vals[m])) for m in LAST_LAYER_METRICS if m in last_vals
    ]
    rows += [(RUN_LAYER, math.nan, m, float(run_vals[m])) for m in PATH_METRICS if m in run_vals]
    return pd.DataFrame(rows, columns=["layer", "rel_pos", "metric", "value"]).astype(
        {"layer": "int64", "rel_pos": "float64", "metric": str, "value": "float64"}
    )


def curves_table(ts: list[float], curves: dict[str, Tensor]) -> pd.DataFrame:
    keys = [k for k in PFC_METRICS if k in curves]
    values = torch.cat([curves[k].to(F64) for k in keys]).cpu().numpy() if keys else []
    return pd.DataFrame(
        {
            "t": np.tile(np.asarray(ts, dtype=np.float64), len(keys)),
            "metric": [k for k in keys for _ in ts],
            "value": np.asarray(values, dtype=np.float64),
        }
    ).astype({"metric": str})
