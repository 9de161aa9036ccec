"""The results format, in one place: file names, columns, metric names, reader and writer.

Torch-free, so ``analysis/`` and the tests import it without the training stack. A job
directory holds:

- :data:`RESULTS_FILE`: the tidy table, one row per (run, epoch, layer, metric) -- and per
  (model, lam) for surrogate jobs. Run-level scalars have ``layer`` = :data:`RUN_LAYER`.
- :data:`CURVES_FILE`: the geodesic-curve predictions, one row per (run, epoch, t, metric).
- :data:`DONE_FILE`: written last, only when the job finished.
- :data:`RUN_ID_FILE`, :data:`CHECKPOINT_FILE`: the job's id and its resume state.
- :data:`FINGERPRINT_FILE`: the config the job dir belongs to; :data:`LOCK_FILE`: held by the
  running job; :data:`ERROR_FILE`: the one-line error of a failed job.

A sweep dir holds the job dirs, :data:`SWEEP_RECORD_FILE` (the sweep it belongs to),
:data:`SWEEP_LOCK_FILE` (held by the submitting process) and :data:`SWEEP_ERRORS_DIR`.

Both tables carry the resolved config, the job status and :data:`SCHEMA_VERSION` as JSON in
the parquet key-value metadata under :data:`METADATA_KEY`. Every file is written through
:func:`atomic_write` (a temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ALIGNMENT",
    "CHECKPOINT_FILE",
    "COLUMNS",
    "CURVES_FILE",
    "CURVE_COLUMNS",
    "CURVE_KEY",
    "DATA_MODEL",
    "DONE_FILE",
    "EFFECTIVE_DEPTH",
    "ENERGY_RATIO",
    "EPOCH_METRICS",
    "ERROR_FILE",
    "FINGERPRINT_FILE",
    "GEODESIC_ERR_METRICS",
    "GRAD_NORM",
    "LAST_LAYER_METRICS",
    "LAYER_METRICS",
    "LOCK_FILE",
    "LR",
    "METADATA_KEY",
    "NC1",
    "NC2_EQUIANGLE",
    "NC2_EQUINORM",
    "NC3",
    "NC4",
    "NET_MODEL",
    "OBJECTIVE",
    "PATH_METRICS",
    "PFC1",
    "PFC2",
    "PFC3",
    "PFC_METRICS",
    "RESULTS_FILE",
    "RESULT_KEY",
    "RUN_COLUMNS",
    "RUN_ID_FILE",
    "RUN_LAYER",
    "SCHEMA_VERSION",
    "STATUSES",
    "STRAIGHTNESS",
    "SURROGATE_METRICS",
    "SURROGATE_MODELS",
    "SWEEP_ERRORS_DIR",
    "SWEEP_LOCK_FILE",
    "SWEEP_RECORD_FILE",
    "TEMP_GLOB",
    "TEST_ACC",
    "TEST_LOSS",
    "THM1_INNER",
    "TRAIN_ACC",
    "TRAIN_LOSS",
    "TRANSPORT_COST",
    "TR_SB",
    "TR_SW",
    "atomic_write",
    "atomic_write_bytes",
    "conform",
    "empty_frame",
    "is_done",
    "read_curves",
    "read_metadata",
    "read_results",
    "read_table",
    "write_table",
]

#: Bumped whenever a column, a file or the meaning of a value changes.
SCHEMA_VERSION = 2

# ------------------------------------------------------------------------------ files
RESULTS_FILE = "metrics.parquet"
CURVES_FILE = "curves.parquet"
DONE_FILE = "done"
RUN_ID_FILE = "run_id"
CHECKPOINT_FILE = "checkpoint.pt"
FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = ".lock"
ERROR_FILE = "error.txt"
#: Folder of a sweep dir where each failed job of a ``-m`` run leaves
#: ``<invocation id>/<job num>.txt`` (one folder per invocation of ``launch.py -m``).
SWEEP_ERRORS_DIR = ".errors"
#: In a sweep dir: held (``flock``) by the submitting ``launch.py -m`` for the sweep's life.
SWEEP_LOCK_FILE = ".sweep.lock"
#: In a sweep dir: the sweep it belongs to (its swept and fixed overrides, in Hydra's order).
SWEEP_RECORD_FILE = "sweep.json"
#: Temporary files of :func:`atomic_write` (``.<name>.<random>.tmp``); stale ones are removed.
TEMP_GLOB = ".*.*.tmp"
METADATA_KEY = b"pfc_sweeps"
STATUSES = ("running", "done", "diverged", "failed")

# ------------------------------------------------------------------------------ names
#: The paper's three PFC metrics: Tr S_W / Tr S_B, the distance of the Gram to the simplex
#: ETF, and the NCC accuracy (section III).
PFC1, PFC2, PFC3 = "pfc1", "pfc2", "pfc3"
#: Tr Sigma_W and Tr Sigma_B of a layer (PFC1 is their ratio).
TR_SW, TR_SB = "tr_sw", "tr_sb"
#: The classic neural-collapse metrics: NC1, NC2 (equal norms, equal angles), NC3, NC4.
NC1, NC2_EQUINORM, NC2_EQUIANGLE = "nc1", "nc2_equinorm", "nc2_equiangle"
NC3, NC4 = "nc3", "nc4"
#: Run-level scalars of the forward path: the first layer with NCC error <= epsilon, the
#: straightness and energy ratio of the path, Theorem 1's inner product, Theorem 2's cost.
EFFECTIVE_DEPTH, STRAIGHTNESS, ENERGY_RATIO = "effective_depth", "straightness", "energy_ratio"
THM1_INNER, TRANSPORT_COST = "thm1_inner", "transport_cost"
#: Run-level scalars of a training epoch (LR: the learning rate the epoch trained with).
TRAIN_LOSS, TRAIN_ACC, TEST_LOSS, TEST_ACC, LR = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
)
#: Surrogate-solve scalars: ||H/||H||_F - X/||X||_F||_F, F(W, H) and the norm of its gradient.
ALIGNMENT, OBJECTIVE, GRAD_NORM = "alignment", "objective", "grad_norm"

PFC_METRICS = (PFC1, PFC2, PFC3)
#: Per-layer metrics of a training epoch (every studied layer 0..L).
LAYER_METRICS = (*PFC_METRICS, NC1, NC2_EQUINORM, NC2_EQUIANGLE, TR_SW, TR_SB)
#: |observed - geodesic prediction at t = rel_pos|, per layer.
GEODESIC_ERR_METRICS = tuple(f"geodesic_err_{m}" for m in PFC_METRICS)
#: Metrics of the last layer only (they need the classifier).
LAST_LAYER_METRICS = (NC3, NC4)
#: Run-level scalars of the forward path (``layer`` = RUN_LAYER).
PATH_METRICS = (EFFECTIVE_DEPTH, STRAIGHTNESS, ENERGY_RATIO, THM1_INNER, TRANSPORT_COST)
#: Run-level scalars of every training epoch (``layer`` = RUN_LAYER).
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACC, TEST_LOSS, TEST_ACC, LR)
#: Per (model, lam) metrics of a surrogate solve.
SURROGATE_METRICS = (*PFC_METRICS, ALIGNMENT, OBJECTIVE, GRAD_NORM)

#: ``model`` label of a trained network's rows, of the data X, and of the surrogate models.
NET_MODEL = "net"
DATA_MODEL = "data"
SURROGATE_MODELS = ("mufm", "ufm")
#: ``layer`` of run-level rows (epoch scalars, path scalars, surrogate rows).
RUN_LAYER = -1

# ------------------------------------------------------------------------------ columns
#: Columns shared by both tables: which run a row belongs to.
RUN_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "sweep_id": pa.string(),
    "task": pa.string(),
    "dataset": pa.string(),
    "arch": pa.string(),
    "loss": pa.string(),
    "seed": pa.int64(),
    "lam": pa.float64(),
    "lam_w": pa.float64(),
}
#: :data:`RESULTS_FILE` column name -> pyarrow type, in table order.
COLUMNS: dict[str, pa.DataType] = {
    **RUN_COLUMNS,
    "epoch": pa.int64(),
    "split": pa.string(),
    "layer": pa.int64(),
    "rel_pos": pa.float64(),
    "metric": pa.string(),
    "value": pa.float64(),
    "model": pa.string(),
}
#: :data:`CURVES_FILE` column name -> pyarrow type: the prediction at ``t`` in [0, 1].
CURVE_COLUMNS: dict[str, pa.DataType] = {
    **RUN_COLUMNS,
    "epoch": pa.int64(),
    "t": pa.float64(),
    "metric": pa.string(),
    "value": pa.float64(),
}
_SCHEMAS = {RESULTS_FILE: COLUMNS, CURVES_FILE: CURVE_COLUMNS}
#: Columns that identify one measurement of :data:`RESULTS_FILE` (``rel_pos`` is measured).
RESULT_KEY = ("run_id", "epoch", "layer", "metric", "model", "lam", "lam_w", "split")
#: Columns that identify one point of a curve in :data:`CURVES_FILE`.
CURVE_KEY = ("run_id", "epoch", "metric", "t")


# ------------------------------------------------------------------------------ writing
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, fsync, ``os.replace``.

    A reader (or a rerun after a crash) sees the old file or the new one, never half of one.
    The file gets the mode ``open()`` would give it (0666 less the umask), so collaborators
    can read a shared sweep directory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # TEMP_GLOB
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def conform(df: pd.DataFrame, columns: dict[str, pa.DataType] = COLUMNS) -> pa.Table:
    """``df``'s ``columns``, in order, typed as ``columns`` says (a pyarrow table).

    Raises ``KeyError`` naming a missing column and ``pyarrow.ArrowInvalid`` /
    ``pyarrow.ArrowTypeError`` for a value of the wrong kind.
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"missing column(s) {missing}; the table needs {list(columns)}")
    schema = pa.schema(list(columns.items()))
    return pa.Table.from_pandas(df[list(columns)], schema=schema, preserve_index=False)


def write_table(
    path: str | os.PathLike[str],
    df: pd.DataFrame,
    meta: dict[str, Any] | None = None,
    columns: dict[str, pa.DataType] | None = None,
) -> Path:
    """Write ``df`` atomically as parquet with ``meta`` (+ the schema version) as metadata.

    The columns and types are ``columns``, by default those of the file's name
    (:data:`COLUMNS` for :data:`RESULTS_FILE`, :data:`CURVE_COLUMNS` for :data:`CURVES_FILE`);
    any other name, or an empty ``columns``, keeps ``df``'s own columns.
    """
    path = Path(path)
    columns = columns if columns is not None else _SCHEMAS.get(path.name)
    if columns:
        table = conform(df, columns)
    else:
        table = pa.Table.from_pandas(df, preserve_index=False)
    blob = json.dumps({**(meta or {}), "schema_version": SCHEMA_VERSION}, default=str)
    table = table.replace_schema_metadata({METADATA_KEY: blob.encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def empty_frame(name: str = RESULTS_FILE) -> pd.DataFrame:
    """An empty, correctly typed table of ``name`` (a results or curves file)."""
    return pa.schema(list(_SCHEMAS[name].items())).empty_table().to_pandas()


# ------------------------------------------------------------------------------ reading
def _decode(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    raw = (metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata dict of a parquet file written by :func:`write_table` ({} if none)."""
    return _decode(pq.read_schema(path).metadata)


def read_table(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A parquet file written by :func:`write_table`, and its metadata dict.

    One file only: a directory is an ``OSError``, never read as a dataset that would merge
    whatever parquet files it holds (or give an empty table while a job creates its directory).
    """
    with pq.ParquetFile(path) as f:  # closed here, not whenever it is garbage collected
        table = f.read()
    return table.to_pandas(), _decode(table.schema.metadata)


def read_results(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A job's :data:`RESULTS_FILE` and its metadata (``config``, ``status``, ...).

    ``path`` is the parquet file or the job directory holding it.
    """
    path = Path(path)
    return read_table(path / RESULTS_FILE if path.is_dir() else path)


def read_curves(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A job's :data:`CURVES_FILE` (an empty table when the job wrote no curves).

    ``path`` is the job directory or the curves file itself.
    """
    path = Path(path)
    path = path / CURVES_FILE if path.is_dir() else path
    if not path.exists():
        return empty_frame(CURVES_FILE)
    return read_table(path)[0]


def is_done(out_dir: str | os.PathLike[str]) -> bool:
    """True when the job in ``out_dir`` finished and wrote its ``done`` marker."""
    return (Path(out_dir) / DONE_FILE).exists()
