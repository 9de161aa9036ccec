"""The results sink of one job: collects tidy rows and curve points and writes them in the
format of :mod:`pfc_sweeps.results.schema` (which owns file names, columns, metadata, reader and
writer)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pfc_sweeps.results.schema import (
    COLUMNS,
    CURVE_COLUMNS,
    CURVES_FILE,
    DONE_FILE,
    NET_MODEL,
    RESULTS_FILE,
    RUN_COLUMNS,
    STATUSES,
    atomic_write_bytes,
    empty_frame,
    write_table,
)

__all__ = ["CURVE_ROW_COLUMNS", "ROW_COLUMNS", "ResultsSink", "print_summary"]

#: Columns a caller of :meth:`ResultsSink.add` must give; the rest come from the run's meta.
ROW_COLUMNS = ("epoch", "layer", "metric", "value")
#: Columns a caller of :meth:`ResultsSink.add_curves` must give.
CURVE_ROW_COLUMNS = ("epoch", "t", "metric", "value")
ROW_DEFAULTS: dict[str, Any] = {"split": "train", "rel_pos": np.nan, "model": NET_MODEL}


def print_summary(rows: pd.DataFrame, index: list[str], title: str, path: Path) -> None:
    """Print tidy ``rows`` as a wide table (one column per metric), then where the results are."""
    wide = rows.pivot_table(index=index, columns="metric", values="value")
    print(title)
    print(wide.reset_index().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"Results: {path}")


class _Rows:
    """Rows of one table (``columns``), checked on the way in, concatenated lazily."""

    def __init__(self, name: str, columns: Mapping[str, Any], required: tuple[str, ...]):
        self.name, self.columns, self.required = name, list(columns), required
        self.frames: list[pd.DataFrame] = []

    def add(self, df: pd.DataFrame, defaults: Mapping[str, Any]) -> None:
        if df.empty:
            return
        missing = [c for c in self.required if c not in df.columns]
        if missing:
            raise ValueError(f"result rows lack columns {missing}; required: {list(self.required)}")
        unknown = sorted(set(df.columns) - set(self.columns))
        if unknown:
            raise ValueError(f"unknown result columns {unknown}; allowed: {self.columns}")
        values = df["value"].to_numpy(dtype=float)
        if not np.isfinite(values).all():
            bad = df.loc[~np.isfinite(values), list(self.required[:-1])].head(3)
            raise ValueError(f"non-finite metric values would be written: {bad.to_dict('records')}")
        for c, v in defaults.items():
            if c not in df.columns:
                df[c] = v
        self.frames.append(df[self.columns])

    def frame(self) -> pd.DataFrame:
        if not self.frames:
            return empty_frame(self.name)
        df = pd.concat(self.frames, ignore_index=True)
        self.frames = [df]
        return df

    def load(self, df: pd.DataFrame) -> None:
        self.frames = [df[self.columns].copy()] if len(df) else []


def _as_frame(rows: pd.DataFrame | Iterable[Mapping[str, Any]], fixed: dict) -> pd.DataFrame:
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for k, v in fixed.items():
        df[k] = v
    return df


class ResultsSink:
    """Collects one job's rows (``metrics.parquet``) and curve points (``curves.parquet``).

    Args:
        out_dir: the job's output directory.
        meta: run-level columns (:data:`~pfc_sweeps.results.schema.RUN_COLUMNS`): run_id, sweep_id,
            task, dataset, arch, loss, seed, lam, lam_w. A row may override them.
        config: the resolved config (a plain dict), stored as JSON in the parquet metadata.
    """

    def __init__(self, out_dir: str | os.PathLike[str], meta: Mapping[str, Any], config: Any):
        missing = [c for c in RUN_COLUMNS if c not in meta]
        if missing:
            raise ValueError(f"ResultsSink meta lacks {missing}; needs all of {list(RUN_COLUMNS)}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.curves_path = self.out_dir / CURVES_FILE
        self.meta = {c: meta[c] for c in RUN_COLUMNS}
        self.config = config
        self._rows = _Rows(RESULTS_FILE, COLUMNS, ROW_COLUMNS)
        self._curves = _Rows(CURVES_FILE, CURVE_COLUMNS, CURVE_ROW_COLUMNS)

    # ------------------------------------------------------------------ rows
    def add(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]], **fixed: Any) -> None:
        """Add rows with at least epoch, layer, metric, value; ``fixed`` sets columns for all.

        Optional row columns (split, rel_pos, model, and the run columns such as lam, lam_w,
        arch) default to ``train``, NaN, ``net`` and the run's meta. Non-finite values are
        rejected here: a table never holds a silent NaN metric.
        """
        self._rows.add(_as_frame(rows, fixed), {**ROW_DEFAULTS, **self.meta})

    def add_curves(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]], **fixed: Any) -> None:
        """Add curve points with at least epoch, t, metric, value (``metric``: the PFC metric
        that the curve predicts, e.g. ``pfc1``); the run columns come from the meta."""
        self._curves.add(_as_frame(rows, fixed), self.meta)

    def frame(self) -> pd.DataFrame:
        """All rows so far, typed as :data:`~pfc_sweeps.results.schema.COLUMNS`."""
        return self._rows.frame()

    def curves_frame(self) -> pd.DataFrame:
        """All curve points so far, typed as :data:`~pfc_sweeps.results.schema.CURVE_COLUMNS`."""
        return self._curves.frame()

    def load_rows(self, df: pd.DataFrame, curves: pd.DataFrame | None = None) -> None:
        """Replace the rows and curve points (when resuming from a checkpoint that holds them)."""
        self._rows.load(df)
        self._curves.load(curves if curves is not None else empty_frame(CURVES_FILE))

    # ----------------------------------------------------------------- files
    def write(self, status: str = "running") -> Path:
        """Write both tables atomically with the config and ``status`` in their metadata.

        ``curves.parquet`` is written (first) only by jobs that record curves.
        """
        if status not in STATUSES:
            raise ValueError(f"status={status!r}; allowed: {STATUSES}")
        meta = {"config": self.config, "status": status}
        curves = self.curves_frame()
        if len(curves) or self.curves_path.exists():
            write_table(self.curves_path, curves, meta)
        return write_table(self.path, self.frame(), meta)

    def finish(self, status: str = "done") -> Path:
        """Write the final tables, then (only for ``done``) the ``done`` marker, last."""
        path = self.write(status)
        if status == "done":
            atomic_write_bytes(self.out_dir / DONE_FILE, b"")
        return path
