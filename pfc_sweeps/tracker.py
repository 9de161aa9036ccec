"""Streaming per-layer collapse tracker (docs/metrics.md; paper Fig. 2-3).

Usage::

    tracker = CollapseTracker(num_classes, geodesic_ts=torch.linspace(0, 1, 101))
    for x, y in batches:                       # pass 1
        logits, feats = model(x)
        tracker.update(feats, y)               # feats: list of (B, d_l), layers 0..L
    tracker.end_pass()
    if tracker.needs_second_pass:              # the features did not fit `cache_bytes`
        for x, y in batches:                   # same samples, any order / batching
            tracker.update(model(x)[1], y)
        tracker.end_pass()
    result = tracker.compute()                 # result.table, result.curves

Pass 1 accumulates, per layer, the class sums (K, d_l) and counts, plus the per-step path
lengths (which need no means), so after pass 1 the relative positions r_l are known. Pass 2
needs the final means: within-class traces, the NC1 projection Z = Htilde^T (h - m_y), NCC
predictions, the geodesic NCC terms at ts ∪ {r_l}, the cross term B and NC4. State is
O(L K d + K T) float64, independent of N. When every layer's features fit in `cache_bytes`,
they are kept (by reference, on their own device) and pass 2 runs on the cache inside
``end_pass``; then one forward pass suffices and ``needs_second_pass`` is False.

Features must not be modified in place after ``update`` (the cache keeps references).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from pfc_sweeps.metrics import (
    F64,
    DegenerateFeaturesError,
    MetricInputError,
    _check_classifier,
    check_counts,
    check_num_classes,
    class_moments,
    cross_within,
    effective_depth,
    geodesic_bernstein_diag,
    geodesic_coefficients,
    geodesic_from_stats,
    geodesic_gram,
    geodesic_ncc_correct,
    geodesic_score_matrix,
    nc3_from_stats,
    nc_from_stats,
    one_hot64,
    pfc_from_stats,
    relative_positions_from_lengths,
    rows_per_chunk,
    second_moments,
)

__all__ = [
    "LAYER_METRICS",
    "RUN_METRICS",
    "CollapseResult",
    "CollapseTracker",
    "TrackerStateError",
]

LAYER_METRICS = (
    "pfc1",
    "pfc2",
    "pfc3",
    "nc1",
    "nc2_equinorm",
    "nc2_equiangle",
    "tr_sw",
    "tr_sb",
)
GEODESIC_ERR_METRICS = ("geodesic_err_pfc1", "geodesic_err_pfc2", "geodesic_err_pfc3")
LAST_LAYER_METRICS = ("nc3", "nc4")
RUN_METRICS = ("effective_depth", "straightness", "energy_ratio", "thm1_inner", "transport_cost")


class TrackerStateError(RuntimeError):
    """The tracker was used out of order (fed after it was finalized, passes mixed...)."""


@dataclass
class CollapseResult:
    """table: DataFrame[layer:int64, rel_pos:float64, metric:str, value:float64];
    curves: DataFrame[t:float64, metric:str (pfc1/pfc2/pfc3), value:float64] (empty if no ts)."""

    table: pd.DataFrame
    curves: pd.DataFrame

    def rows(self) -> pd.DataFrame:
        """table + curves in the results schema: curve rows become metric geodesic_<m>,
        layer=-1, rel_pos=t (design doc "Geodesic curve rows")."""
        curves = pd.DataFrame(
            {
                "layer": pd.Series(-1, index=self.curves.index, dtype="int64"),
                "rel_pos": self.curves["t"].astype("float64"),
                "metric": "geodesic_" + self.curves["metric"].astype(str),
                "value": self.curves["value"].astype("float64"),
            }
        )
        return pd.concat([self.table, curves], ignore_index=True)


class _Workspace:
    """Reusable float64 row-chunk buffers (fresh large allocations page-fault on every chunk)."""

    def __init__(self, rows: int, dim: int, device: torch.device) -> None:
        self.rows, self.dim, self.device = rows, dim, device
        self._bufs: dict[str, Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def get(self, name: str, shape: torch.Size) -> Tensor:
        """Float64 buffer `name` viewed as `shape` (b, d) with b <= rows, d <= dim."""
        key = (name, tuple(shape))
        view = self._views.get(key)
        if view is not None:
            return view
        numel = shape[0] * shape[1]
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel:  # sized to the largest chunk seen
            buf = self._bufs[name] = torch.empty(
                min(self.rows, shape[0]) * self.dim, dtype=F64, device=self.device
            )
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        view = self._views[key] = buf[:numel].view(shape)
        return view

    def load(self, name: str, h: Tensor) -> Tensor:
        """Copy the chunk h (b, d), any float dtype, into buffer `name` as float64 (b, d)."""
        return self.get(name, h.shape).copy_(h)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


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


class CollapseTracker:
    """Streaming PFC/NC metrics of all layers; see the module docstring for the protocol.

    num_classes: K >= 2. geodesic_ts: t values in [0, 1] for the geodesic curves (None: no
    curves and no geodesic_err_* rows; requires all layers to have the same dimension).
    cache_bytes: budget for caching the features of one pass (0 disables; two passes then).
    epsilon: NCC-error threshold of the effective depth. classifier_weight (K, d_L) and optional
    classifier_bias (K,): enable NC3/NC4 of the last layer.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        geodesic_ts: Tensor | Sequence[float] | None = None,
        cache_bytes: int = 2**30,
        epsilon: float = 0.01,
        classifier_weight: Tensor | None = None,
        classifier_bias: Tensor | None = None,
    ) -> None:
        self.num_classes = check_num_classes(num_classes)
        if geodesic_ts is not None:
            ts = torch.as_tensor(geodesic_ts, dtype=F64).detach().cpu()
            if ts.dim() != 1 or ts.numel() == 0:
                raise MetricInputError(
                    f"geodesic_ts must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}"
                )
            if not bool(torch.isfinite(ts).all() & (ts >= 0).all() & (ts <= 1).all()):
                raise MetricInputError(f"geodesic_ts must lie in [0, 1], got {ts.tolist()}")
            geodesic_ts = ts
        self.geodesic_ts: Tensor | None = geodesic_ts
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise MetricInputError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self.cache_bytes = cache_bytes
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and 0 <= epsilon <= 1):
            raise MetricInputError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
        self.epsilon = float(epsilon)
        if classifier_bias is not None and classifier_weight is None:
            raise MetricInputError("classifier_bias given without classifier_weight")
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
    def num_layers(self) -> int | None:
        return None if self._dims is None else len(self._dims)

    @property
    def state_bytes(self) -> int:
        """Bytes of all accumulators plus the float64 chunk workspace (<= 4 x rows x d), excluding
        the feature cache: O(L K d + K T), independent of the number of samples N."""
        total = self._ws.nbytes if self._dims is not None else 0
        for v in vars(self).values():
            items = v if isinstance(v, list) else [v]
            for t in items:
                if isinstance(t, Tensor) and t is not self._weight and t is not self._bias:
                    total += t.numel() * t.element_size()
        return total

    @property
    def cached_bytes(self) -> int:
        return self._cached if self._cache is not None else 0

    # ----------------------------------------------------------------------------- setup
    def _init_state(self, layers: list[Tensor]) -> None:
        k = self.num_classes
        self._dims = [h.shape[1] for h in layers]
        dev = self._device = layers[0].device
        n_layers = len(layers)
        self._same_dims = all(d == self._dims[0] for d in self._dims)
        self._path = self._same_dims and n_layers >= 2
        if self.geodesic_ts is not None and not self._path:
            raise MetricInputError(
                "geodesic_ts needs >= 2 layers of one dimension (h(t) = (1-t) h0 + t hL and "
                f"path lengths); got layer dims {self._dims}"
            )
        if self._weight is not None:
            _check_classifier(self._weight, self._dims[-1], k, self._bias)
            self._w64 = self._weight.to(device=dev, dtype=F64)
            self._b64 = (
                torch.zeros(k, dtype=F64, device=dev)
                if self._bias is None
                else self._bias.to(device=dev, dtype=F64)
            )
        # pass 1
        self._counts = torch.zeros(k, dtype=F64, device=dev)
        self._sums = [torch.zeros(k, d, dtype=F64, device=dev) for d in self._dims]
        steps = max(n_layers - 1, 0)
        self._plen = torch.zeros(steps, dtype=F64, device=dev)  # sum_i ||h^{l+1} - h^l||
        self._psq = torch.zeros(steps, dtype=F64, device=dev)  # sum_i ||h^{l+1} - h^l||^2
        self._disp = torch.zeros(2, dtype=F64, device=dev)  # sum_i ||h^L - h^0||, ^2
        self._oob = torch.zeros((), dtype=torch.int64, device=dev)
        dmax = max(self._dims)
        self._ws = _Workspace(rows_per_chunk(dmax, dev), dmax, dev)

    def _check_batch(self, features: Sequence[Tensor], labels: Tensor) -> tuple[list, Tensor]:
        layers = _flatten_layers(features)
        b = layers[0].shape[0]
        for i, h in enumerate(layers):
            if h.shape[0] != b:
                raise MetricInputError(
                    f"all layers need the same batch size; layer 0 has {b}, layer {i} has "
                    f"{h.shape[0]}"
                )
            if h.device != layers[0].device:
                raise MetricInputError(
                    f"all layers must be on one device; layer 0 on {layers[0].device}, "
                    f"layer {i} on {h.device}"
                )
        if self._dims is not None:
            dims = [h.shape[1] for h in layers]
            if dims != self._dims:
                raise MetricInputError(
                    f"layer dims {dims} differ from the first batch's {self._dims} "
                    f"({len(dims)} vs {len(self._dims)} layers); every batch of every pass "
                    "must come from the same layers"
                )
            if layers[0].device != self._device:
                raise MetricInputError(
                    f"features on {layers[0].device}, earlier batches on {self._device}"
                )
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != b:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise MetricInputError(f"labels must have shape ({b},), got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise MetricInputError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        labels = labels.to(device=layers[0].device, dtype=torch.int64)
        return layers, labels

    def _checked_labels(self, labels: Tensor) -> Tensor:
        """Range check: immediate on CPU; on CUDA deferred to end_pass (no host sync)."""
        k = self.num_classes
        if labels.device.type == "cpu":
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
                raise MetricInputError(
                    f"labels out of range: min {int(labels.min())}, max {int(labels.max())}; "
                    f"allowed 0..{k - 1}"
                )
            return labels
        self._oob += ((labels < 0) | (labels >= k)).sum()
        return labels.clamp(0, k - 1)

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
        labels = self._checked_labels(labels)
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
            self._check_oob()
            check_counts(self._counts, " in pass 1")
            for i, s in enumerate(self._sums):
                if not bool(torch.isfinite(s).all()):
                    raise MetricInputError(f"features of layer {i} contain NaN or inf")
            self._finish_pass1()
            if self._cache is not None:
                self._begin_pass2()
                for layers, labels in self._cache:
                    self._pass2_batch(layers, labels)
                self._cache = None
                self._finish_pass2()
                self._phase = "done"
            else:
                self._begin_pass2()
                self._phase = "await2"
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
        self._result = self._compute()
        self._phase = "computed"
        return self._result

    # ----------------------------------------------------------------------------- pass 1
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
        # pass 1 keeps 4 chunk buffers alive (x0, a, b, d), pass 2 two: halve the rows so the
        # working set stays cache resident on CPU
        ws = self._ws
        rows = max(1, ws.rows // 2) if self._device.type == "cpu" else ws.rows
        steps, disps = [], []
        splits = [h.split(rows) for h in layers]  # per layer: chunks of `rows` rows
        for c, s in enumerate(range(0, labels.shape[0], rows)):
            y = labels[s : s + rows]
            self._counts += torch.bincount(y, minlength=self.num_classes)
            # class sums: index_add_ is fastest on CPU, the one-hot GEMM on accelerators
            onehot = None if self._device.type == "cpu" else one_hot64(y, self.num_classes).T
            x0 = prev = None
            chunk_steps = []
            for i, chunks in enumerate(splits):
                # buffers: layer 0 stays in "x0" (for h^L - h^0); others alternate "a"/"b"
                x = ws.load("x0" if i == 0 else "ab"[i % 2], chunks[c])  # (b, d) float64
                if onehot is None:
                    self._sums[i].index_add_(0, y, x)  # (K, d) class sums
                else:
                    self._sums[i].addmm_(onehot, x)
                if self._path:
                    if i == 0:
                        x0 = x
                    elif i == 1:
                        diff = torch.sub(x0, x, out=ws.get("d", x.shape))
                    else:  # prev's buffer is dead after this step: subtract in place
                        diff = prev.sub_(x)
                    if i > 0:
                        chunk_steps.append(torch.linalg.vector_norm(diff, dim=1))  # (b,)
                    prev = x
            if self._path:
                steps.append(torch.stack(chunk_steps))  # (L, b)
                disps.append(torch.linalg.vector_norm(x0.sub_(x), dim=1))  # (b,)
        if self._path:
            step = torch.cat(steps, dim=1)  # (L, B) per-sample step lengths
            disp = torch.cat(disps)  # (B,)
            self._plen += step.sum(dim=1)
            self._psq += step.square().sum(dim=1)
            self._disp += torch.stack([disp.sum(), disp.square().sum()])

    def _check_oob(self) -> None:
        bad = int(self._oob)
        if bad:
            raise MetricInputError(
                f"{bad} label(s) out of range; allowed 0..{self.num_classes - 1}"
            )

    def _finish_pass1(self) -> None:
        self._n = int(self._counts.sum())
        self._g, self._ht, self._gram = [], [], []
        for s in self._sums:
            _, g, ht, gram = class_moments(self._counts, s)
            self._g.append(g)
            self._ht.append(ht)
            self._gram.append(gram)
        self._gram_s = torch.stack(self._gram)  # (L+1, K, K)
        self._gdiag_s = torch.diagonal(self._gram_s, dim1=1, dim2=2).contiguous()  # (L+1, K)
        # pass-2 right-hand sides: layer 0 also projects on HtL, layer L on Ht0 (geodesic
        # cross terms) and on the classifier W (NC4), all in the same matmul
        rhs = list(self._ht)
        last = len(self._ht) - 1
        if self.geodesic_ts is not None:
            rhs[0] = torch.cat([self._ht[0], self._ht[last]])
            rhs[last] = torch.cat([self._ht[last], self._ht[0]])
        if self._weight is not None:
            rhs[last] = torch.cat([rhs[last], self._w64])
            self._logit_shift = self._g[last] @ self._w64.T + self._b64  # (K,)
        self._rhs_t = [r.T.contiguous() for r in rhs]  # (d, K + extra)
        self._sums = []  # the means live on in g + ht
        self._r = relative_positions_from_lengths(self._plen) if self._path else None
        if self.geodesic_ts is not None:
            assert self._r is not None
            # evaluate the curve at ts and at every r_l (prediction errors) in one go
            self._ts_all = torch.cat([self.geodesic_ts.to(self._device), self._r])
            self._coef = geodesic_coefficients(self._ts_all)  # (T + L + 1, 3)
            self._x01 = self._ht[0] @ self._ht[-1].T  # (K, K)
            gram_t = geodesic_gram(self._coef, self._gram[0], self._x01, self._gram[-1])
            gdiag_t = torch.diagonal(gram_t, dim1=1, dim2=2)  # (T', K)
            self._smat = geodesic_score_matrix(self._coef, gdiag_t).contiguous()  # (K, T', 4)
            self._bern = geodesic_bernstein_diag(self._gram[0], self._x01, self._gram[-1])

    # ----------------------------------------------------------------------------- pass 2
    def _begin_pass2(self) -> None:
        k, dev, n_layers = self.num_classes, self._device, len(self._dims)
        self._counts2 = torch.zeros(k, dtype=F64, device=dev)
        self._trw = torch.zeros(n_layers, dtype=F64, device=dev)
        self._zz = torch.zeros(n_layers, k, k, dtype=F64, device=dev)
        self._correct = torch.zeros(n_layers, dtype=torch.int64, device=dev)
        self._disagree = torch.zeros((), dtype=torch.int64, device=dev)
        if self.geodesic_ts is not None:
            self._trw_cross = torch.zeros((), dtype=F64, device=dev)
            self._correct_t = torch.zeros(self._coef.shape[0], dtype=torch.int64, device=dev)

    def _pass2_batch(self, layers: list[Tensor], labels: Tensor) -> None:
        rows = self._ws.rows
        splits = [h.split(rows) for h in layers]
        for c, y in enumerate(labels.split(rows)):
            self._pass2_chunk([chunks[c] for chunks in splits], y)

    def _pass2_chunk(self, layers: list[Tensor], y: Tensor) -> None:
        k, b, n_layers = self.num_classes, y.shape[0], len(layers)
        last = n_layers - 1
        self._counts2 += torch.bincount(y, minlength=k).to(F64)
        proj = torch.empty(n_layers, b, k, dtype=F64, device=y.device)  # u Ht^T per layer
        uu, u0, extra0 = [], None, None
        for i, h in enumerate(layers):
            u = self._ws.load("x0" if i == 0 else "a", h).sub_(self._g[i])  # (b, d) h - g
            flat = u.view(-1)
            uu.append(torch.dot(flat, flat))
            rhs_t = self._rhs_t[i]  # (d, K + extra)
            if rhs_t.shape[1] == k:
                torch.mm(u, rhs_t, out=proj[i])
                continue
            proj_all = u @ rhs_t  # (b, K + extra): own Ht, other end's Ht, classifier
            proj[i] = proj_all[:, :k]
            if i == last:
                self._pass2_last(y, u0, extra0, proj[0], u, proj_all)
            else:  # layer 0 with the geodesic: keep u0 ("x0" buffer) and u0 HtL^T
                u0, extra0 = u, proj_all[:, k:]
        trw, zz, pred = second_moments(torch.stack(uu), proj, y, self._gram_s, self._gdiag_s)
        self._trw += trw
        self._zz += zz
        self._correct += (pred == y).sum(dim=1)
        if self._weight is not None:
            self._disagree += (self._logits.argmax(dim=1) != pred[last]).sum()

    def _pass2_last(self, y, u0, extra0, p0, ul, proj_all) -> None:
        """Last layer: geodesic terms (cross term B, NCC along the curve) and NC4 logits.

        u0, ul (b, d) centered features of layers 0 and L; extra0 = u0 HtL^T; p0 = u0 Ht0^T;
        proj_all = ul [HtL; Ht0; W]^T (the rows present depend on the options)."""
        k = self.num_classes
        if self.geodesic_ts is not None:
            c01, c10 = extra0[:, :k], proj_all[:, k : 2 * k]
            self._trw_cross += cross_within(u0, ul, c01, c10, self._x01, y)
            self._correct_t += geodesic_ncc_correct(
                self._smat, self._bern, p0, c01 + c10, proj_all[:, :k], y
            )
        if self._weight is not None:  # logits = u W^T + (g W^T + b)
            self._logits = proj_all[:, -k:] + self._logit_shift

    def _finish_pass2(self) -> None:
        if not bool(torch.equal(self._counts2, self._counts)):
            raise MetricInputError(
                "pass 2 saw different data than pass 1: class counts "
                f"{self._counts2.long().tolist()} vs {self._counts.long().tolist()}; feed the "
                "same samples in both passes"
            )
        if not bool(torch.isfinite(self._trw).all() & torch.isfinite(self._zz).all()):
            bad = (~torch.isfinite(self._trw)).nonzero().flatten().tolist()
            raise MetricInputError(f"features of layer(s) {bad} contain NaN or inf in pass 2")

    # ----------------------------------------------------------------------------- results
    def _compute(self) -> CollapseResult:
        n, n_layers = self._n, len(self._dims)
        last = n_layers - 1
        gram = torch.stack(self._gram)  # (L+1, K, K)
        tr_sb = torch.diagonal(gram, dim1=1, dim2=2).sum(-1)
        bad = (tr_sb <= 0).nonzero().flatten().tolist()
        if bad:
            raise DegenerateFeaturesError(
                f"layer(s) {bad}: Tr(Sigma_B) = 0 (all class means coincide); PFC1/PFC2 undefined"
            )
        per_layer = pfc_from_stats(n, self._trw, gram, self._correct)
        per_layer = {key: per_layer[key] for key in ("pfc1", "pfc2", "pfc3")} | {
            "tr_sw": per_layer["tr_sw"],
            "tr_sb": per_layer["tr_sb"],
        }
        nc_rows = []
        for i in range(n_layers):
            try:
                nc_rows.append(nc_from_stats(n, self._gram[i], self._zz[i]))
            except DegenerateFeaturesError as err:
                raise DegenerateFeaturesError(f"layer {i}: {err}") from None
        for key in ("nc1", "nc2_equinorm", "nc2_equiangle"):
            per_layer[key] = torch.stack([row[key] for row in nc_rows])
        run: dict[str, Tensor] = {}
        if self.geodesic_ts is not None:
            t_count = self.geodesic_ts.numel()
            curve = geodesic_from_stats(
                self._ts_all,
                n,
                self._trw[0],
                self._trw_cross,
                self._trw[last],
                self._gram[0],
                self._x01,
                self._gram[-1],
                self._correct_t,
            )
            for key in ("pfc1", "pfc2", "pfc3"):
                per_layer[f"geodesic_err_{key}"] = (per_layer[key] - curve[key][t_count:]).abs()
        if self._path:
            run["straightness"] = self._disp[0] / self._plen.sum()
            if bool(self._disp[1] > 0):
                run["energy_ratio"] = last * self._psq.sum() / self._disp[1]
        if n_layers >= 2 and self._dims[0] == self._dims[-1]:
            run["thm1_inner"] = (self._ht[0] * self._ht[-1]).sum()
            run["transport_cost"] = (self._ht[-1] - self._ht[0]).square().sum()
        last_rows: dict[str, Tensor] = {}
        if self._weight is not None:
            if not bool(torch.linalg.norm(self._w64) > 0):
                raise MetricInputError("classifier weight is all zeros: NC3 is undefined")
            last_rows["nc3"] = nc3_from_stats(self._w64, self._ht[-1])
            last_rows["nc4"] = self._disagree.to(F64) / n

        # one device->host transfer for everything
        names = list(per_layer)
        host = torch.stack([per_layer[k].to(F64) for k in names]).cpu().tolist()
        rel = self._r.cpu().tolist() if self._r is not None else [math.nan] * n_layers
        rows = []
        for j, key in enumerate(names):
            rows += [(i, rel[i], key, host[j][i]) for i in range(n_layers)]
        rows += [(last, rel[last], key, float(v)) for key, v in last_rows.items()]
        ncc_err = [1.0 - v for v in host[names.index("pfc3")]]
        rows.append(
            (-1, math.nan, "effective_depth", float(effective_depth(ncc_err, self.epsilon)))
        )
        rows += [(-1, math.nan, key, float(v)) for key, v in run.items()]
        table = pd.DataFrame(rows, columns=["layer", "rel_pos", "metric", "value"]).astype(
            {"layer": "int64", "rel_pos": "float64", "metric": str, "value": "float64"}
        )
        curve_rows = []
        if self.geodesic_ts is not None:
            ts = self.geodesic_ts.tolist()
            for key in ("pfc1", "pfc2", "pfc3"):
                vals = curve[key][:t_count].cpu().tolist()
                curve_rows += [(t, key, v) for t, v in zip(ts, vals, strict=True)]
        curves = pd.DataFrame(curve_rows, columns=["t", "metric", "value"]).astype(
            {"t": "float64", "metric": str, "value": "float64"}
        )
        return CollapseResult(table=table, curves=curves)
