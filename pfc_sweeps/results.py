"""The tidy results table of one job: ``metrics.parquet`` plus a ``done`` marker.

One row per (run, epoch, layer, metric) -- and per (model, lam) for surrogate jobs, per t
(held in ``rel_pos``) for geodesic-curve rows. Schema: :data:`COLUMNS` (documented in
README.md). Every write goes to a temporary file in the same directory and is moved into
place with :func:`os.replace`, so a reader never sees half a table. The resolved config
and the job status travel in the parquet key-value metadata under ``pfc_sweeps``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "COLUMNS",
    "DONE_FILE",
    "METADATA_KEY",
    "RESULTS_FILE",
    "ResultsSink",
    "atomic_write",
    "atomic_write_bytes",
    "is_done",
    "print_summary",
    "read_results",
]

RESULTS_FILE = "metrics.parquet"
DONE_FILE = "done"
METADATA_KEY = b"pfc_sweeps"
STATUSES = ("running", "done", "diverged", "failed")

#: Column name -> pyarrow type, in table order.
COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "sweep_id": pa.string(),
    "task": pa.string(),
    "dataset": pa.string(),
    "arch": pa.string(),
    "loss": pa.string(),
    "seed": pa.int64(),
    "lam": pa.float64(),
    "lam_w": pa.float64(),
    "epoch": pa.int64(),
    "split": pa.string(),
    "layer": pa.int64(),
    "rel_pos": pa.float64(),
    "metric": pa.string(),
    "value": pa.float64(),
    "model": pa.string(),
}
SCHEMA = pa.schema(list(COLUMNS.items()))
#: Columns a caller of :meth:`ResultsSink.add` must give; the rest come from the run's meta.
ROW_COLUMNS = ("epoch", "layer", "metric", "value")
META_COLUMNS = ("run_id", "sweep_id", "task", "dataset", "arch", "loss", "seed", "lam", "lam_w")
ROW_DEFAULTS: dict[str, Any] = {"split": "train", "rel_pos": np.nan, "model": "net"}


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, fsync, os.replace.

    A reader (or a rerun after a crash) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def is_done(out_dir: str | os.PathLike[str]) -> bool:
    """True when the job in ``out_dir`` finished and wrote its ``done`` marker."""
    return (Path(out_dir) / DONE_FILE).exists()


def print_summary(rows: pd.DataFrame, index: list[str], title: str, path: Path) -> None:
    """Print tidy ``rows`` as a wide table (one column per metric), then where the results are."""
    wide = rows.pivot_table(index=index, columns="metric", values="value")
    print(title)
    print(wide.reset_index().to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"Results: {path}")


def read_results(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a job's table and its metadata ``{"config": ..., "status": ...}``.

    ``path`` is the parquet file or the job directory holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    return table.to_pandas(), meta


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
            return SCHEMA.empty_table().to_pandas()
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
        table = pa.Table.from_pandas(self.frame(), schema=SCHEMA, preserve_index=False)
        blob = json.dumps({"config": self.config, "status": status}, default=str)
        table = table.replace_schema_metadata({METADATA_KEY: blob.encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(self.path, sink.getvalue().to_pybytes())
        return self.path

    def finish(self, status: str = "done") -> Path:
        """Write the final table, then (only for ``done``) the ``done`` marker, last."""
        path = self.write(status)
        if status == "done":
            atomic_write_bytes(self.out_dir / DONE_FILE, b"")
        return path
