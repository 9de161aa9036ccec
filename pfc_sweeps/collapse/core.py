"""The tracker of one run of layers (paper Fig. 2-3): the pass protocol over the accumulators.

:class:`LayerRunTracker` gives every layer its per-layer metrics and, when its layers share one
dimension (>= 2 layers), the path quantities: relative depth, geodesic curves, straightness,
energy ratio, transport. :class:`~pfc_sweeps.collapse.tracker.CollapseTracker` (the public API)
composes one per leading layer of another shape, one for the trailing run of equal-shape
layers and one for a separate classifier input.

The statistics are the accumulators of :mod:`pfc_sweeps.collapse.accumulators`: pass 1 gathers the
class sums and the path lengths (so the relative positions r_l are known after it); pass 2
needs the final means: within-class traces, the NC1 projection, NCC hits, the geodesic terms
at ts and every r_l, and NC4. State is O(L K d + K T), independent of N. When every layer's
features fit in `cache_bytes`, they are kept (by reference, on their own device) and pass 2
runs on the cache inside ``end_pass``; then one forward pass suffices.

Precision (docs/precision.md): float64 features take the exact float64 path; float32, bf16
and fp16 features the fast path (float32 row operations, float64 statistics), unless
``precision="float64"``. Features must not be modified in place after ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from pfc_sweeps.collapse import accumulators as acc
from pfc_sweeps.collapse.distributed import all_reduce_sums, any_rank, check_group
from pfc_sweeps.collapse.inputs import (
    GEMM_ROW_ALIGN,
    MetricInputError,
    add_counts,
    block_rows,
    check_counts,
    check_num_classes,
    even_sizes,
    rows_per_chunk,
)
from pfc_sweeps.collapse.kernels import ExactKernel, FastKernel, Routes, Workspace, work_dtype
from pfc_sweeps.collapse.metrics import F64, _check_classifier
from pfc_sweeps.collapse.table import collect, curves_table, long_table

__all__ = ["PRECISIONS", "CollapseResult", "LayerRunTracker", "TrackerStateError"]

#: ``precision`` of the tracker: "auto" (float64 features exact, others fast) or "float64".
PRECISIONS = ("auto", "float64")


class TrackerStateError(RuntimeError):
    """The tracker was used out of order (fed after it was finalized, passes mixed...)."""


@dataclass
class CollapseResult:
    """table: DataFrame[layer:int64, rel_pos:float64, metric:str, value:float64];
    curves: DataFrame[t:float64, metric:str (pfc1/pfc2/pfc3), value:float64] (empty if no ts)."""

    table: pd.DataFrame
    curves: pd.DataFrame


def _flatten_layers(features: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(features, Tensor) or not isinstance(features, Sequence) or not features:
        raise MetricInputError(
            "features must be a non-empty list of per-layer tensors (B, d_l), got "
            f"{type(features).__name__}"
        )
    out = []
    for i, h in enumerate(features):
        if not isinstance(h, Tensor) or h.dim() < 2 or not h.is_floating_point():
            desc = f"{h.dtype} {tuple(h.shape)}" if isinstance(h, Tensor) else type(h).__name__
            raise MetricInputError(
                f"features of layer {i} must be a floating tensor (B, ...), got {desc}"
            )
        out.append(h.detach().flatten(1))
    return out


def _check_same_batch(layers: list[Tensor]) -> None:
    b = layers[0].shape[0]
    for i, h in enumerate(layers):
        if h.shape[0] != b:
            raise MetricInputError(
                f"all layers need the same batch size; layer 0 has {b}, layer {i} has {h.shape[0]}"
            )
        if h.device != layers[0].device:
            raise MetricInputError(
                f"all layers must be on one device; layer 0 on {layers[0].device}, "
                f"layer {i} on {h.device}"
            )


def _check_labels(labels: Tensor, b: int, device: torch.device) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != b:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise MetricInputError(f"labels must have shape ({b},), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise MetricInputError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    return labels.to(device=device, dtype=torch.int64)


def _check_ts(geodesic_ts) -> Tensor | None:
    if geodesic_ts is None:
        return None
    ts = torch.as_tensor(geodesic_ts, dtype=F64).detach().cpu()
    if ts.dim() != 1 or ts.numel() == 0:
        raise MetricInputError(
            f"geodesic_ts must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}"
        )
    if not bool(torch.isfinite(ts).all() & (ts >= 0).all() & (ts <= 1).all()):
        raise MetricInputError(f"geodesic_ts must lie in [0, 1], got {ts.tolist()}")
    return ts


def _range_checked(labels: Tensor, k: int, oob: Tensor) -> Tensor:
    """Range check: immediate on CPU; on CUDA counted into ``oob`` (checked at end_pass, so
    no host sync per batch) and clamped meanwhile."""
    if labels.device.type == "cpu":
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise MetricInputError(
                f"labels out of range: min {int(labels.min())}, max {int(labels.max())}; "
                f"allowed 0..{k - 1}"
            )
        return labels
    oob += ((labels < 0) | (labels >= k)).sum()
    return labels.clamp(0, k - 1)


def _check_args(cache_bytes, epsilon, weight, bias, precision) -> None:
    """The tracker's scalar arguments (MetricInputError naming the argument)."""
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise MetricInputError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and 0 <= epsilon <= 1):
        raise MetricInputError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
    if bias is not None and weight is None:
        raise MetricInputError("classifier_bias given without classifier_weight")
    if precision not in PRECISIONS:
        raise MetricInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_like_first(layers: list[Tensor], dims: list[int], device: torch.device) -> None:
    """Every batch of every pass comes from the layers (and the device) of the first."""
    got = [h.shape[1] for h in layers]
    if got != dims:
        raise MetricInputError(
            f"layer dims {got} differ from the first batch's {dims} ({len(got)} vs {len(dims)} "
            "layers); every batch of every pass must come from the same layers"
        )
    if layers[0].device != device:
        raise MetricInputError(f"features on {layers[0].device}, earlier batches on {device}")


def _tensor_bytes(objs: Sequence[object], exclude: Sequence[Tensor | None]) -> int:
    """Bytes of the tensors held by the objects' attributes (directly or in lists/tuples/dict
    values), each counted once, except ``exclude`` (the caller's classifier)."""
    seen = {id(t) for t in exclude if t is not None}
    total = 0
    for obj in objs:
        for v in vars(obj).values() if obj is not None else ():
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else [v]
            for t in vals:
                if isinstance(t, Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


class _full_precision:
    """No autocast and no TF32/reduced-precision float32 matmuls inside the tracker."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        self._prec = torch.get_float32_matmul_precision()
        self._cudnn = torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        self._auto = torch.autocast(self.device.type, enabled=False)
        self._auto.__enter__()

    def __exit__(self, *exc) -> None:
        self._auto.__exit__(*exc)
        torch.set_float32_matmul_precision(self._prec)
        torch.backends.cudnn.allow_tf32 = self._cudnn


class LayerRunTracker:
    """Streaming PFC/NC metrics of one run of layers: the arguments and the protocol of
    :class:`~pfc_sweeps.collapse.tracker.CollapseTracker`, except that ``geodesic_ts`` needs
    all layers to share one dimension (path quantities need it too)."""

    def __init__(
        self,
        num_classes: int,
        *,
        geodesic_ts: Tensor | Sequence[float] | None = None,
        cache_bytes: int = 2**30,
        epsilon: float = 0.01,
        classifier_weight: Tensor | None = None,
        classifier_bias: Tensor | None = None,
        precision: str = "auto",
        process_group: object = None,
    ) -> None:
        self.num_classes = check_num_classes(num_classes)
        self._group = check_group(process_group)
        self.geodesic_ts: Tensor | None = _check_ts(geodesic_ts)
        _check_args(cache_bytes, epsilon, classifier_weight, classifier_bias, precision)
        self.cache_bytes, self.epsilon, self.precision = cache_bytes, float(epsilon), precision
        self._weight = classifier_weight.detach() if classifier_weight is not None else None
        self._bias = classifier_bias.detach() if classifier_bias is not None else None
        # phase: pass1 -> (await2 -> pass2 ->) done -> computed
        self._phase = "pass1"
        self._dims: list[int] | None = None
        self._device: torch.device | None = None
        self._result: CollapseResult | None = None
        self._cache: list[tuple[list[Tensor], Tensor]] | None = [] if cache_bytes > 0 else None
        self._cached = 0
        self._batches = 0

    # ----------------------------------------------------------------------------- properties
    @property
    def needs_second_pass(self) -> bool:
        """True after pass 1 when the features were not cached and pass 2 is still due."""
        return self._phase in ("await2", "pass2")

    @property
    def state_bytes(self) -> int:
        """Bytes of all accumulators, the class means and their Grams (after pass 1), the
        kernel's tables and the chunk workspace, excluding the feature cache: O(L (K d + K^2)
        + K T), independent of the number of samples N."""
        if self._dims is None:
            return 0
        kernel, means = getattr(self, "_kernel", None), getattr(self, "_means", None)
        objs = (self, means, *self._accs.values(), kernel)
        return self._ws.nbytes + _tensor_bytes(objs, (self._weight, self._bias))

    @property
    def cached_bytes(self) -> int:
        return self._cached if self._cache is not None else 0

    # ----------------------------------------------------------------------------- setup
    def _init_state(self, layers: list[Tensor]) -> None:
        k = self.num_classes
        self._dims = [h.shape[1] for h in layers]
        dev = self._device = layers[0].device
        self._path = all(d == self._dims[0] for d in self._dims) and len(layers) >= 2
        if self.geodesic_ts is not None and not self._path:
            raise MetricInputError(
                "geodesic_ts needs >= 2 layers of one dimension (h(t) = (1-t) h0 + t hL and "
                f"path lengths); got layer dims {self._dims}"
            )
        if self._weight is not None:
            _check_classifier(self._weight, self._dims[-1], k, self._bias)
        self._dtype = work_dtype(layers[0].dtype, self.precision)
        dmax = max(self._dims)
        rows = rows_per_chunk(dmax, dev, self._dtype.itemsize)  # pass 1
        if self._dtype == F64 and dev.type == "cpu":  # float64 pass 1 keeps 4 chunk buffers
            rows = max(1, rows // 2)  # alive (x0, a, b, d): halve them to stay cache resident
        self._rows1 = rows
        rows2 = rows_per_chunk(dmax, dev, self._dtype.itemsize, pass2=True)  # the kernels'
        self._ws = Workspace(max(rows, rows2), dmax, dev, self._dtype)
        self._oob = torch.zeros((), dtype=torch.int64, device=dev)
        self._accs: dict[str, object] = {"sums": acc.ClassSums(k, self._dims, dev, self._dtype)}
        if self._path:
            self._accs["path"] = acc.PathLengths(len(layers) - 1, dev)

    def _check_batch(self, features: Sequence[Tensor], labels: Tensor) -> tuple[list, Tensor]:
        layers = _flatten_layers(features)
        _check_same_batch(layers)
        if self._dims is not None:
            _check_like_first(layers, self._dims, self._device)
        return layers, _check_labels(labels, layers[0].shape[0], layers[0].device)

    # ----------------------------------------------------------------------------- protocol
    def update(self, features: Sequence[Tensor], labels: Tensor) -> None:
        """Feed one batch: features = list of (B, d_l) (or (B, ...), flattened), labels (B,)."""
        if self._phase in ("done", "computed"):
            raise TrackerStateError(
                "update() after the tracker was finalized (end_pass() already produced all "
                f"statistics; needs_second_pass is False; phase {self._phase!r}); "
                "create a new CollapseTracker for new data"
            )
        layers, labels = self._check_batch(features, labels)
        if self._dims is None:
            self._init_state(layers)
        labels = _range_checked(labels, self.num_classes, self._oob)
        with _full_precision(self._device):
            if self._phase == "pass1":
                self._pass1_batch(layers, labels)
                self._cache_batch(layers, labels)
            else:  # await2 / pass2
                self._phase = "pass2"
                self._pass2_batch(layers, labels)
        self._batches += 1

    def end_pass(self) -> None:
        """Close the current pass. After pass 1 with everything cached, also run pass 2."""
        if self._phase == "pass1":
            if self._batches == 0:
                raise TrackerStateError("end_pass() before any update(): pass 1 saw no batches")
            cache, self._cache = self._cache, None
            if any_rank(cache is None, self._group, self._device):  # same passes on all ranks
                cache = None
            with _full_precision(self._device):
                self._finish_pass1()
                for layers, labels in cache or ():
                    self._pass2_batch(layers, labels)
                if cache is not None:
                    self._finish_pass2()
            self._phase = "done" if cache is not None else "await2"
        elif self._phase == "pass2":
            self._check_oob()
            self._finish_pass2()
            self._phase = "done"
        elif self._phase == "await2":
            raise TrackerStateError(
                "end_pass() for pass 2 but no batch was fed since pass 1 ended; feed the same "
                "data again (needs_second_pass is True)"
            )
        else:
            raise TrackerStateError(
                f"end_pass() called again after the last pass ended (phase {self._phase!r})"
            )

    def compute(self) -> CollapseResult:
        """All metrics as a CollapseResult (valid once the last pass has ended)."""
        if self._phase == "computed":
            assert self._result is not None
            return self._result
        if self._phase != "done":
            what = {
                "pass1": "pass 1 is still open: call end_pass() first",
                "await2": "needs_second_pass is True: feed the data again and call end_pass()",
                "pass2": "pass 2 is still open: call end_pass() first",
            }[self._phase]
            raise TrackerStateError(f"compute() too early: {what}")
        with _full_precision(self._device):
            self._result = self._compute()
        self._phase = "computed"
        return self._result

    # ----------------------------------------------------------------------------- passes
    def _cache_batch(self, layers: list[Tensor], labels: Tensor) -> None:
        if self._cache is None:
            return
        self._cached += sum(h.numel() * h.element_size() for h in layers)
        self._cached += labels.numel() * labels.element_size()
        if self._cached > self.cache_bytes:
            self._cache = None  # does not fit: drop it, pass 2 will be fed by the caller
        else:
            self._cache.append((layers, labels))

    def _pass1_batch(self, layers: list[Tensor], labels: Tensor) -> None:
        ws, pass1, rows = self._ws, list(self._accs.values()), self._rows1
        splits = [h.split(rows) for h in layers]
        for c, y in enumerate(labels.split(rows)):
            for i, chunks in enumerate(splits):
                x = ws.load("x0" if i == 0 else "ab"[i % 2], chunks[c])  # (b, d) work dtype
                for a in pass1:
                    a.update(i, x, y, ws)
            for a in pass1:
                a.end_chunk(y)

    def _pass2_batch(self, layers: list[Tensor], labels: Tensor) -> None:
        """Blocks of rows: the kernel chunks the (b, d) work; accumulators see whole blocks."""
        sizes = even_sizes(labels.shape[0], self._block_rows, GEMM_ROW_ALIGN)
        splits = [h.split(sizes) for h in layers]
        for c, y in enumerate(labels.split(sizes)):
            block = self._kernel.pass2([chunks[c] for chunks in splits], y)
            add_counts(self._counts2, y)
            for a in self._pass2:
                a.update(block)

    def _reduce(self, names: tuple[str, ...], *extra: Tensor) -> None:
        """All-reduce the sums of the named accumulators (and extra tensors) over the group."""
        if self._group is not None:
            sums = [t for n in names if n in self._accs for t in self._accs[n].sum_tensors()]
            all_reduce_sums([*sums, *extra], self._group)

    def _check_oob(self) -> None:
        oob = self._oob.clone()
        self._reduce((), oob)
        bad = int(oob)
        if bad:
            raise MetricInputError(
                f"{bad} label(s) out of range; allowed 0..{self.num_classes - 1}"
            )

    def _finish_pass1(self) -> None:
        self._check_oob()
        self._reduce(("sums", "path"))
        sums = self._accs["sums"]
        check_counts(sums.counts, " in pass 1")
        self._n = int(sums.counts.sum())
        geodesic = self.geodesic_ts is not None
        lm = self._means = sums.compute(geodesic, self._weight)
        self._r = self._accs["path"].positions() if self._path else None
        kernel = ExactKernel if self._dtype == F64 else FastKernel
        routes = Routes.of(self._dims, self.num_classes)
        self._kernel = kernel(lm, self._ws, geodesic, routes)
        self._block_rows = block_rows(self._device, self._kernel.row_elements)
        k, dev = self.num_classes, self._device
        self._counts2 = torch.zeros(k, dtype=F64, device=dev)
        self._accs["within"] = acc.WithinClass(self._dims, k, routes, dev)
        if geodesic:
            self._accs["geodesic"] = acc.GeodesicCurve(self.geodesic_ts, self._r, lm)
        if self._weight is not None:
            self._accs["classifier"] = acc.Classifier(self._weight, self._bias, lm)
        self._pass2 = [
            self._accs[n] for n in ("within", "geodesic", "classifier") if n in self._accs
        ]

    def _finish_pass2(self) -> None:
        self._accs["within"].add_scatter(self._kernel.take_scatter())
        self._reduce(("within", "geodesic", "classifier"), self._counts2)
        offsets = self._kernel.offsets(self._counts2)  # the fast path's r = h - m'_y: exact
        for a in self._pass2 if offsets is not None else ():
            a.apply(offsets)
        if not bool(torch.equal(self._counts2, self._accs["sums"].counts)):
            raise MetricInputError(
                "pass 2 saw different data than pass 1: class counts "
                f"{self._counts2.long().tolist()} vs {self._accs['sums'].counts.long().tolist()}; "
                "feed the same samples in both passes"
            )
        self._accs["within"].check_finite()

    # ----------------------------------------------------------------------------- results
    def _compute(self) -> CollapseResult:
        n_layers = len(self._dims)
        rel = self._r.cpu().tolist() if self._r is not None else [math.nan] * n_layers
        ts = self.geodesic_ts.tolist() if self.geodesic_ts is not None else []
        transport = n_layers >= 2 and self._dims[0] == self._dims[-1]
        vals = collect(self._accs, self._n, self._means, self.epsilon, transport)
        return CollapseResult(table=long_table(rel, *vals[:3]), curves=curves_table(ts, vals[3]))
