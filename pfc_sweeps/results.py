"""The results sink of one job: collects tidy rows and writes them in the format of
:mod:`pfc_sweeps.schema` (which owns file names, columns, metadata, reader and writer)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .schema import (
    COLUMNS,
    DONE_FILE,
    RESULTS_FILE,
    STATUSES,
    atomic_write_bytes,
    empty_frame,
    write_table,
)

__all__ = ["ROW_COLUMNS", "ResultsSink", "print_summary"]

#: Columns a caller of :meth:`ResultsSink.add` must give; the rest come from the run's meta.
ROW_COLUMNS = ("epoch", "layer", "metric", "value")
META_COLUMNS = ("run_id", "sweep_id", "task", "dataset", "arch", "loss", "seed", "lam", "lam_w")
ROW_DEFAULTS: dict[str, Any] = {"split": "train", "rel_pos": np.nan, "model": "net"}


def print_summary(rows: pd.DataFrame, index: list[str], title: str, path: Path) -> None:
    """Print tidy ``rows`` as a wide table (one column per metric), then where the results are."""
    wide = rows.pivot_table(index=index, columns="metric", values="value")
    print(title)
    print(wide.reset_index().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"Results: {path}")


class ResultsSink:
    """Collects tidy rows for one job and writes them to ``<out_dir>/metrics.parquet``.

    Args:
        out_dir: the job's output directory.
        meta: run-level columns: run_id, sweep_id, task, dataset, arch, loss, seed, lam, lam_w.
        config: the resolved config (a plain dict), stored as JSON in the parquet metadata.
    """

    def __init__(self, out_dir: str | os.PathLike[str], meta: Mapping[str, Any], config: Any):
        missing = [c for c in META_COLUMNS if c not in meta]
        if missing:
            raise ValueError(f"ResultsSink meta lacks {missing}; needs all of {list(META_COLUMNS)}")
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / RESULTS_FILE
        self.meta = dict(meta)
        self.config = config
        self._frames: list[pd.DataFrame] = []

    # ------------------------------------------------------------------ rows
    def add(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]], **fixed: Any) -> None:
        """Add rows with at least epoch, layer, metric, value; ``fixed`` sets columns for all.

        Optional row columns (split, rel_pos, model, lam, lam_w) default to
        ``train``, NaN, ``net`` and the run's meta. Non-finite values are rejected here:
        a table never holds a silent NaN metric.
        """
        df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        if df.empty:
            return
        for k, v in fixed.items():
            df[k] = v
        missing = [c for c in ROW_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"result rows lack columns {missing}; required: {list(ROW_COLUMNS)}")
        unknown = sorted(set(df.columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown result columns {unknown}; allowed: {list(COLUMNS)}")
        values = df["value"].to_numpy(dtype=float)
        if not np.isfinite(values).all():
            bad = df.loc[~np.isfinite(values), ["epoch", "layer", "metric"]].head(3)
            raise ValueError(f"non-finite metric values would be written: {bad.to_dict('records')}")
        for c, v in ROW_DEFAULTS.items():
            if c not in df.columns:
                df[c] = v
        for c in META_COLUMNS:
            if c not in df.columns:
                df[c] = self.meta[c]
        self._frames.append(df[list(COLUMNS)])

    def frame(self) -> pd.DataFrame:
        """All rows so far, typed as :data:`COLUMNS`."""
        if not self._frames:
            return empty_frame(RESULTS_FILE)
        df = pd.concat(self._frames, ignore_index=True)
        self._frames = [df]
        return df

    def load_rows(self, df: pd.DataFrame) -> None:
        """Replace the rows (used when resuming from a checkpoint that holds them)."""
        self._frames = [df[list(COLUMNS)].copy()] if len(df) else []

    # ----------------------------------------------------------------- files
    def write(self, status: str = "running") -> Path:
        """Write the table atomically with the config and ``status`` in its metadata."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r}; allowed: {STATUSES}")
        return write_table(self.path, self.frame(), {"config": self.config, "status": status})

    def finish(self, status: str = "done") -> Path:
        """Write the final table, then (only for ``done``) the ``done`` marker, last."""
        path = self.write(status)
        if status == "done":
            atomic_write_bytes(self.out_dir / DONE_FILE, b"")
        return path
