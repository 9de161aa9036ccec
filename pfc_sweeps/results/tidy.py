"""Shared selections on the tidy results table (:mod:`pfc_sweeps.results.schema`) and labels.

Pure pandas helpers used by :mod:`analysis.figures` and :mod:`pfc_sweeps.results.summary`. Rows are
told apart by their ``model`` column: ``net`` (a trained network), ``data`` (the data X of a
surrogate job) or a surrogate model (``mufm``, ``ufm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from pfc_sweeps.results.schema import (
    ALIGNMENT,
    DATA_MODEL,
    EFFECTIVE_DEPTH,
    ENERGY_RATIO,
    NET_MODEL,
    PFC1,
    PFC2,
    PFC3,
    STRAIGHTNESS,
    SURROGATE_MODELS,
)

__all__ = [
    "LOG_METRICS",
    "METRIC_LABELS",
    "add_condition",
    "at_last_epoch",
    "ci95",
    "condition_order",
    "seed_clashes",
    "surrogate_rows",
    "train_rows",
]

DATASET_ORDER = ("digits", "gaussian", "mnist", "fashion_mnist", "cifar10", "stl10", "cifar100")
"""Data sets in the paper's order (Fig. 2 (a)-(e)), the small test sets first."""

METRIC_LABELS = {
    PFC1: r"PFC1: $\mathrm{Tr}(\Sigma_W)/\mathrm{Tr}(\Sigma_B)$",
    PFC2: r"PFC2: $\Vert G/\Vert G\Vert_F - E\Vert_F$",
    PFC3: "PFC3: NCC accuracy",
    ALIGNMENT: r"alignment $\Vert H/\Vert H\Vert_F - X/\Vert X\Vert_F\Vert_F$",
    STRAIGHTNESS: "straightness",
    ENERGY_RATIO: "energy ratio",
    EFFECTIVE_DEPTH: "effective depth",
}
"""Axis labels: the metrics named as the paper does (section III, "The three PFC metrics")."""


LOG_METRICS = frozenset({PFC1})
"""Metrics drawn on a log axis (PFC1 spans orders of magnitude)."""


def ci95(values: Sequence[float] | pd.Series) -> tuple[float, float]:
    """95% confidence interval of the mean (Student t, n-1 dof), for seaborn's ``errorbar=``.

    Used instead of seaborn's bootstrap ("ci", 95): exact for normal seeds, and fast enough for
    thousands of (epoch, layer) points. Returns (nan, nan) for fewer than 2 finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n < 2:
        return (math.nan, math.nan)
    m = float(x.mean())
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return (m - half, m + half)


def train_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of trained networks (model "net"), with a fresh 0..n-1 index."""
    return df.loc[df["model"] == NET_MODEL].reset_index(drop=True)


def surrogate_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of surrogate runs (model in data / mufm / ufm), with a fresh 0..n-1 index.

    The solver writes the data's rows with lam = lam_w = NaN (X does not depend on λ); their
    lam_w is filled here with the run's λ_W (first non-missing value of the run), so that data
    and solutions of one run share a setting. lam stays NaN.
    """
    sur = df.loc[df["model"].isin((DATA_MODEL, *SURROGATE_MODELS))].reset_index(drop=True)
    if sur["lam_w"].isna().any():
        run_lw = sur.groupby("run_id")["lam_w"].transform("first")
        sur = sur.assign(lam_w=sur["lam_w"].fillna(run_lw))
    return sur


def at_last_epoch(df: pd.DataFrame, by: Sequence[str] = ("run_id",)) -> pd.DataFrame:
    """Keep, within each group of ``by``, only the rows of the group's largest epoch."""
    if df.empty:
        return df
    by = list(by)
    last = df.groupby(by, dropna=False)["epoch"].transform("max")
    return df.loc[df["epoch"] == last]


def add_condition(
    df: pd.DataFrame, columns: Sequence[str] = ("dataset", "arch", "loss")
) -> pd.DataFrame:
    """Add a ``condition`` column naming what differs between runs other than the seed.

    The label holds the first column always (the data set) and any later column only where
    it takes more than one value in ``df``, e.g. "digits" or "cifar10 / conv / mse". Runs
    that share a condition are the seeds that the figures average.
    """
    columns = list(columns)
    varying = [c for c in columns[1:] if df[c].nunique(dropna=False) > 1]
    parts = [columns[0], *varying]
    label = df[parts[0]].astype("str")
    for c in parts[1:]:
        label = label + " / " + df[c].astype("str")
    return df.assign(condition=label)


def condition_order(df: pd.DataFrame) -> list[str]:
    """The ``condition`` labels of ``df`` ordered by data set as in the paper, then by name."""
    first = df.groupby("condition", sort=True)["dataset"].first()
    rank = {d: i for i, d in enumerate(DATASET_ORDER)}
    return sorted(first.index, key=lambda c: (rank.get(first[c], len(rank)), c))


def seed_clashes(df: pd.DataFrame) -> list[str]:
    """Warnings for runs that the figures would average as seeds but that share a seed.

    The figures treat runs with the same condition (training: data set, arch, loss;
    surrogate: loss, λ_W, λ) as seeds of one experiment. Two such runs with the same seed
    differ in some other setting (e.g. the learning rate), and averaging them is likely wrong.
    """
    out = []
    tr = train_rows(df)
    if len(tr):
        runs = tr.drop_duplicates("run_id")
        for (d, a, lo, seed), g in runs.groupby(["dataset", "arch", "loss", "seed"]):
            if len(g) > 1:
                out.append(
                    f"training runs {sorted(g['run_id'])} share data set {d}, arch {a}, loss {lo} "
                    f"and seed {seed}: the figures average them as if they were seeds"
                )
    sur = surrogate_rows(df)
    sur = sur.loc[sur["model"] != DATA_MODEL]
    if len(sur):
        keys = sur.drop_duplicates(["run_id", "model", "lam"])
        for (m, lo, lw, lam, seed), g in keys.groupby(["model", "loss", "lam_w", "lam", "seed"]):
            if g["run_id"].nunique() > 1:
                out.append(
                    f"surrogate runs {sorted(g['run_id'].unique())} share model {m}, loss {lo}, "
                    f"λ_W={lw:g}, λ={lam:g} and seed {seed}: the figures average them as seeds"
                )
    return out
