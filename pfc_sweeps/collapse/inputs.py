"""Input checks, errors and work-chunk sizes shared by the metric engine (docs/metrics.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64
# Rows per chunk are chosen so that a work chunk holds at most this many elements:
# _CHUNK_ELEMENTS = 2**24 (128 MiB in float64) on accelerators; on CPU also at most
# _CPU_CHUNK_BYTES = 1 MiB (cache resident: pass 1's elementwise ops are memory bound), and
# _CPU_PASS2_CHUNK_BYTES = 2 MiB in pass 2 (its GEMMs on the class means run faster on wider
# chunks: docs/benchmarks.md "Many classes").
_CHUNK_ELEMENTS = 2**24
_CPU_CHUNK_BYTES = 2**20
_CPU_PASS2_CHUNK_BYTES = 2**21
# per-row statistics (rows x layers x classes) are processed in blocks of this many elements
# on CPU (16 MiB in float64): per-op overhead is paid per block, not per chunk
_CPU_BLOCK_ELEMENTS = 2**21
# ... but a block has at least _MIN_BLOCK_ROWS rows (at large K) as long as it stays within
# _MAX_BLOCK_ELEMENTS (64 MiB in float64 on CPU; the block budget is independent of N)
_MIN_BLOCK_ROWS = 512
_MAX_BLOCK_ELEMENTS = 2**23
# Elements of one (K, T, b) block of geodesic NCC scores (32 MiB in float64).
_GEO_SCORE_ELEMENTS = 2**22


class MetricInputError(ValueError):
    """Bad input to a metric: wrong shape/dtype, labels out of range, NaN/inf features..."""


class EmptyClassError(MetricInputError):
    """A class has no samples, so its mean (and every metric) is undefined."""


class DegenerateFeaturesError(MetricInputError):
    """The features make a metric 0/0, e.g. all class means coincide (Tr Sigma_B = 0)."""


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise MetricInputError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes


def check_features(features: Tensor, name: str = "features") -> Tensor:
    """(N, d) floating tensor with finite entries (checked here, before any work)."""
    if not isinstance(features, Tensor):
        raise MetricInputError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise MetricInputError(f"{name} must have shape (N, d), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise MetricInputError(f"{name} must be a floating tensor, got dtype {features.dtype}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise MetricInputError(f"{name} is empty: shape {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise MetricInputError(f"{name} contain NaN or inf in {bad} row(s); all must be finite")
    return features


def check_labels(labels: Tensor, n: int, num_classes: int, name: str = "labels") -> Tensor:
    """(N,) integer tensor with values in [0, num_classes)."""
    if not isinstance(labels, Tensor):
        raise MetricInputError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise MetricInputError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise MetricInputError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        lo, hi = int(labels.min()), int(labels.max())
        raise MetricInputError(
            f"{name} out of range: min {lo}, max {hi}; allowed 0..{num_classes - 1}"
        )
    return labels.to(torch.int64)


def check_counts(counts: Tensor, where: str = "") -> None:
    """Raise EmptyClassError when a class has no samples."""
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise EmptyClassError(
            f"class(es) {empty} have no samples{where}; every class 0..{counts.numel() - 1} "
            "needs at least one"
        )


def _check_inputs(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    check_num_classes(num_classes)
    check_features(features)
    labels = check_labels(labels, features.shape[0], num_classes).to(features.device)
    return labels


def rows_per_chunk(
    d: int, device: torch.device | str | None = None, itemsize: int = 8, pass2: bool = False
) -> int:
    """Rows per work chunk: ``_CHUNK_ELEMENTS`` // d, on CPU at most
    ``_CPU_CHUNK_BYTES`` // (itemsize d) (cache sized), or ``_CPU_PASS2_CHUNK_BYTES`` for
    pass 2's chunks (``pass2``)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    budget = _CHUNK_ELEMENTS
    if dev.type == "cpu":
        budget = min(budget, (_CPU_PASS2_CHUNK_BYTES if pass2 else _CPU_CHUNK_BYTES) // itemsize)
    return max(1, budget // max(d, 1))


def block_elements(device: torch.device | str | None = None) -> int:
    """Element budget of one block of per-row statistics (rows x layers x classes, float64)
    that the streaming tracker's accumulators see at once: ``_CHUNK_ELEMENTS`` on
    accelerators, ``_CPU_BLOCK_ELEMENTS`` on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _CPU_BLOCK_ELEMENTS if dev.type == "cpu" else _CHUNK_ELEMENTS


def block_rows(device: torch.device | str | None, row_elements: int) -> int:
    """Rows of one pass-2 block whose per-row statistics have ``row_elements`` elements
    (layers x (K + extra rows)): :func:`block_elements` // row_elements, but at least
    ``_MIN_BLOCK_ROWS`` (GEMM-efficient products, few per-block fixed costs) as long as the
    block stays within ``_MAX_BLOCK_ELEMENTS`` (the memory budget, independent of N)."""
    floor = min(_MIN_BLOCK_ROWS, _MAX_BLOCK_ELEMENTS // max(row_elements, 1))
    return max(1, block_elements(device) // max(row_elements, 1), floor)


def even_sizes(n: int, most: int, align: int = 1) -> list[int]:
    """n rows split into ceil(n / most) parts of near-equal size (each <= most): no small
    tail part, whose GEMMs would run at a fraction of the rate. With ``align`` (used when
    most >= 4 align) ``most`` is first rounded down to a multiple of ``align``, every part
    but the last is a multiple of it, and sizes differ by at most ``align`` (GEMMs run faster
    on aligned row counts: docs/benchmarks.md "Many classes")."""
    if most < 4 * align:
        align = 1
    most = max(1, most // align * align)
    parts = max(1, -(-n // most))
    units, rem = divmod(n, align)
    base, extra = divmod(units, parts)
    sizes = [(base + 1) * align] * extra + [base * align] * (parts - extra)
    sizes[-1] += rem
    return sizes


#: pass 2's blocks and chunks are multiples of this many rows (:func:`even_sizes`)
GEMM_ROW_ALIGN = 8


def _chunks(n: int, d: int, device=None) -> list[slice]:
    step = rows_per_chunk(d, device)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def one_hot64(labels: Tensor, num_classes: int) -> Tensor:
    """(B,) labels -> (B, K) float64 indicator matrix (class sums become one matmul)."""
    return one_hot(labels, num_classes, F64)


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B,) labels -> (B, K) indicator matrix of ``dtype`` (class sums become one matmul)."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    out.scatter_(1, labels.view(-1, 1), 1.0)
    return out


def add_counts(counts: Tensor, labels: Tensor) -> None:
    """counts (K,) += per-class counts of labels (B,), in place on the device (index_add_:
    no host-device sync, unlike torch.bincount on CUDA)."""
    counts.index_add_(
        0, labels, torch.ones(1, dtype=counts.dtype, device=counts.device).expand(labels.shape[0])
    )


def simplex_etf(num_classes: int, *, dtype=F64, device=None) -> Tensor:
    """E = (I_K - 1 1^T / K) / sqrt(K - 1), the unit-Frobenius-norm simplex ETF Gram (docs/metrics.md)."""
    k = num_classes
    eye = torch.eye(k, dtype=dtype, device=device)
    return (eye - 1.0 / k) / math.sqrt(k - 1)
