"""One small accumulator per statistic; :class:`~pfc_sweeps.collapse.tracker.CollapseTracker` composes them.

Each accumulator has ``update`` (one row chunk in pass 1, one block of rows in pass 2;
state O(L K d + K T), independent of N) and ``compute`` (its metrics, as tensors keyed by
the names of :mod:`pfc_sweeps.results.schema`).
Pass-1 accumulators see the features chunk by chunk and layer by layer; pass-2 accumulators
see the :class:`~pfc_sweeps.collapse.kernels.Pass2Block` of a precision kernel (per-row scores in
the work dtype, block sums in float64), which needs the final class means. A new metric is one class here and its name in the schema.

Formulas: docs/metrics.md "Notation" and paper eq. 7-9 / 17-19, via :mod:`pfc_sweeps.collapse.metrics`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pfc_sweeps.collapse.geodesic import (
    geodesic_bernstein_diag,
    geodesic_coefficients,
    geodesic_from_stats,
    geodesic_ncc_correct,
    geodesic_score_matrix,
)
from pfc_sweeps.collapse.inputs import (
    DegenerateFeaturesError,
    MetricInputError,
    add_counts,
    one_hot,
)
from pfc_sweeps.collapse.kernels import (
    F32,
    LayerMeans,
    Pass2Block,
    PassOffsets,
    Routes,
    Workspace,
)
from pfc_sweeps.collapse.metrics import (
    F64,
    effective_depth,
    nc3_from_stats,
    relative_positions_from_lengths,
)
from pfc_sweeps.collapse.stats import (
    class_moments,
    nc1_from_gram,
    nc1_from_scatter,
    nc2_from_gram,
    pfc_from_stats,
)
from pfc_sweeps.results.schema import (
    EFFECTIVE_DEPTH,
    ENERGY_RATIO,
    GEODESIC_ERR_METRICS,
    NC1,
    NC2_EQUIANGLE,
    NC2_EQUINORM,
    NC3,
    NC4,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    STRAIGHTNESS,
    THM1_INNER,
    TR_SB,
    TR_SW,
    TRANSPORT_COST,
)

__all__ = [
    "ClassSums",
    "Classifier",
    "EffectiveDepth",
    "GeodesicCurve",
    "PathLengths",
    "Transport",
    "WithinClass",
]

#: float32 class sums are flushed into float64 after this many rows per class (on average):
#: each float32 partial sum then adds at most ~64 centred rows (docs/precision.md).
FLUSH_ROWS_PER_CLASS = 64


# --------------------------------------------------------------------------------------------
# pass 1
# --------------------------------------------------------------------------------------------
class ClassSums:
    """Counts (K,) and class sums (K, d_l) of every layer -> the class means (docs/metrics.md "Notation").

    float64 work chunks are summed in float64. float32 chunks are centred at a per-layer
    reference (the mean of the first chunk), summed in float32 and flushed into float64
    every FLUSH_ROWS_PER_CLASS * K rows, so a float32 partial sum never adds many rows.
    """

    def __init__(
        self, num_classes: int, dims: list[int], device: torch.device, dtype: torch.dtype
    ) -> None:
        k = num_classes
        self.k, self.dtype = k, dtype
        self.counts = torch.zeros(k, dtype=F64, device=device)
        self.sums = [torch.zeros(k, d, dtype=F64, device=device) for d in dims]
        self.ref: list[Tensor] | None = None  # (d,) per layer (float32 path)
        self.part = (
            [] if dtype == F64 else [torch.zeros(k, d, dtype=F32, device=device) for d in dims]
        )
        self._since, self._flush_rows = 0, FLUSH_ROWS_PER_CLASS * k
        self._onehot: Tensor | None = None

    def update(self, i: int, x: Tensor, y: Tensor, ws: Workspace) -> None:
        """Layer i's chunk x (b, d) in the work dtype, labels y (b,)."""
        if self.dtype == F64:
            target, src = self.sums[i], x
        else:
            if self.ref is None:
                self.ref = []
            if len(self.ref) <= i:
                self.ref.append(x.mean(dim=0))  # (d,) float32 reference
            src = torch.sub(x, self.ref[i], out=ws.get("c", x.shape))  # (b, d) h - ref
            target = self.part[i]
        if x.device.type == "cpu":  # index_add_ is fastest on CPU, the one-hot GEMM elsewhere
            target.index_add_(0, y, src)
        else:
            if self._onehot is None:  # one (b, K) one-hot per chunk, in the work dtype
                self._onehot = one_hot(y, self.k, src.dtype)
            target.addmm_(self._onehot.T, src)

    def end_chunk(self, y: Tensor) -> None:
        add_counts(self.counts, y)  # on the device: no host sync
        self._onehot = None
        self._since += y.shape[0]
        if self.part and self._since >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        for s, p in zip(self.sums, self.part, strict=False):
            s += p
            p.zero_()
        self._since = 0

    def sum_tensors(self) -> list[Tensor]:
        """[counts (K,), class sums (K, d_l) per layer], float64, for a distributed all-reduce.
        The float32 path's sums of h - ref are first made sums of h (ranks' refs differ)."""
        self.flush()
        if self.ref is not None:
            for s, r in zip(self.sums, self.ref, strict=True):
                s += self.counts[:, None] * r.to(F64)
            self.ref = None
        return [self.counts, *self.sums]

    def compute(self, geodesic: bool, weight: Tensor | None) -> LayerMeans:
        """The means of every layer, with the geodesic X = Ht0 HtL^T, and the classifier's
        weight in float64."""
        self.flush()
        g, ht = [], []
        gram = self.counts.new_empty(len(self.sums), self.k, self.k)  # (S, K, K)
        for i, s in enumerate(self.sums):
            if not bool(torch.isfinite(torch.stack(torch.aminmax(s))).all()):  # NaN propagates
                raise MetricInputError(f"features of layer {i} contain NaN or inf")
            if self.ref is not None:  # sums of h - ref
                s = s + self.counts[:, None] * self.ref[i].to(F64)
            _, gi, hti, _ = class_moments(self.counts, s, gram_out=gram[i])
            g.append(gi)
            ht.append(hti)
        w = weight.to(device=gram.device, dtype=F64) if weight is not None else None
        self.sums, self.part = [], []  # the means live on in g + ht
        return LayerMeans(
            g=g,
            ht=ht,
            gram=gram,
            gdiag=torch.diagonal(gram, dim1=1, dim2=2).contiguous(),
            x01=ht[0] @ ht[-1].T if geodesic else None,
            w=w,
        )


class PathLengths:
    """sum_i ||h^{l+1}_i - h^l_i|| and its square per step, and of ||h^L_i - h^0_i||
    (docs/metrics.md "Depth coordinate"): relative positions r_l, straightness, energy ratio.
    Norms of float32 chunks are float32 (sums of squares: no cancellation), summed in float64.
    """

    names = (STRAIGHTNESS, ENERGY_RATIO)

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.sums = torch.zeros(2, steps + 1, dtype=F64, device=device)  # [sum, sum sq]
        self._norms: Tensor | None = None  # (steps + 1, b): step norms, then the displacement
        self._x0 = self._prev = None

    @property
    def plen(self) -> Tensor:
        return self.sums[0, : self.steps]

    def update(self, i: int, x: Tensor, y: Tensor, ws: Workspace) -> None:
        """Layer i's chunk; the chunks of layer 0 and of layer i-1 must still be alive."""
        if i == 0:
            self._x0 = self._prev = x
            self._norms = torch.empty(self.steps + 1, x.shape[0], dtype=x.dtype, device=x.device)
            return
        diff = ws.get("d", x.shape)  # (b, d)
        torch.linalg.vector_norm(torch.sub(self._prev, x, out=diff), dim=1, out=self._norms[i - 1])
        self._prev = x
        if i == self.steps:
            torch.sub(self._x0, x, out=diff)
            torch.linalg.vector_norm(diff, dim=1, out=self._norms[i])
            self._x0 = self._prev = None

    def sum_tensors(self) -> list[Tensor]:
        """[path-length sums (2, L+1)] for a distributed all-reduce."""
        return [self.sums]

    def end_chunk(self, y: Tensor) -> None:
        n64 = self._norms.to(F64)  # (steps + 1, b)
        self.sums += torch.stack([n64.sum(1), n64.square().sum(1)])

    def positions(self) -> Tensor:
        """(L+1,) relative depth r_l."""
        return relative_positions_from_lengths(self.plen)

    def compute(self) -> dict[str, Tensor]:
        (plen, psq), (disp, disp_sq) = self.sums[:, : self.steps], self.sums[:, self.steps]
        out = {STRAIGHTNESS: disp / plen.sum()}
        if bool(disp_sq > 0):
            out[ENERGY_RATIO] = self.steps * psq.sum() / disp_sq
        return out


# --------------------------------------------------------------------------------------------
# pass 2
# --------------------------------------------------------------------------------------------
class WithinClass:
    """Tr Sigma_W, NC1's within-class statistic and NCC hits of every layer: PFC1-3 (eq. 7-9),
    NC1, NC2, Tr Sigma_W, Tr Sigma_B (docs/metrics.md "Classic NC metrics", "NC1 routes").

    NC1 per layer by the cheaper exact route: the K x K product Z^T Z where K <= d, the d x d
    within-class scatter where d < K (``routes``). The per-block products arrive in the
    kernel's dtype and are summed in float64."""

    names = (PFC1, PFC2, PFC3, TR_SW, TR_SB, NC1, NC2_EQUINORM, NC2_EQUIANGLE)

    def __init__(
        self, dims: list[int], num_classes: int, routes: Routes, device: torch.device
    ) -> None:
        k, self.routes = num_classes, routes
        self.trw = torch.zeros(len(dims), dtype=F64, device=device)
        self.zz = torch.zeros(len(routes.gram), k, k, dtype=F64, device=device)
        self.sw = {
            i: torch.zeros(dims[i], dims[i], dtype=F64, device=device) for i in routes.scatter
        }
        self.correct = torch.zeros(len(dims), dtype=torch.int64, device=device)

    def update(self, c: Pass2Block) -> None:
        self.trw += c.rr
        if c.z is not None:
            self.zz += torch.bmm(c.z, c.z.transpose(1, 2))  # (S_g, K, b) @ (S_g, b, K)
        self.correct += c.ncc_correct()

    def add_scatter(self, scatter: dict[int, Tensor]) -> None:
        """Add the kernel's summed d x d scatters (before any all-reduce)."""
        for i, part in scatter.items():
            self.sw[i] += part

    def apply(self, offsets: PassOffsets) -> None:
        """Add the kernel's once-per-pass corrections (after any all-reduce)."""
        self.trw += offsets.rr
        self.zz += offsets.zz
        self.add_scatter(offsets.scatter)

    def sum_tensors(self) -> list[Tensor]:
        """[Tr Sigma_W sums (S,), Z^T Z (S_g, K, K), NCC hits (S,), scatters (d, d)...] for a
        distributed all-reduce."""
        return [self.trw, self.zz, self.correct, *self.sw.values()]

    def check_finite(self) -> None:
        ok = torch.isfinite(self.trw).all() & torch.isfinite(self.zz).all()
        for sw in self.sw.values():
            ok &= torch.isfinite(sw).all()
        if not bool(ok):
            bad = (~torch.isfinite(self.trw)).nonzero().flatten().tolist()
            raise MetricInputError(f"features of layer(s) {bad} contain NaN or inf in pass 2")

    def compute(self, n: int, lm: LayerMeans) -> dict[str, Tensor]:
        tr_sb = torch.diagonal(lm.gram, dim1=1, dim2=2).sum(-1)
        bad = (tr_sb <= 0).nonzero().flatten().tolist()
        if bad:
            raise DegenerateFeaturesError(
                f"layer(s) {bad}: Tr(Sigma_B) = 0 (all class means coincide); PFC1/PFC2 undefined"
            )
        out = pfc_from_stats(n, self.trw, lm.gram, self.correct)
        zz = dict(zip(self.routes.gram, self.zz, strict=True))
        rows = []
        for i in range(lm.gram.shape[0]):
            try:
                nc1 = (
                    nc1_from_gram(n, lm.gram[i], zz[i])
                    if i in zz
                    else nc1_from_scatter(n, lm.ht[i], self.sw[i])
                )
                rows.append({NC1: nc1} | nc2_from_gram(lm.gram[i]))
            except DegenerateFeaturesError as err:
                raise DegenerateFeaturesError(f"layer {i}: {err}") from None
        return out | {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


class GeodesicCurve:
    """PFC1-3 of h(t) = (1-t) h0 + t hL at ts and at every r_l (docs/metrics.md "Geodesic-curve
    prediction", Fig. 3): the cross term B and the NCC hits along the curve."""

    names = GEODESIC_ERR_METRICS

    def __init__(self, ts: Tensor, r: Tensor, lm: LayerMeans) -> None:
        self.t_count = ts.numel()
        self.ts_all = torch.cat([ts.to(r.device), r])  # ts, then every r_l
        coef = geodesic_coefficients(self.ts_all)  # (T', 3)
        g0, gl = lm.gram[0], lm.gram[-1]
        self.bern = geodesic_bernstein_diag(g0, lm.x01, gl)  # (3, K)
        gdiag_t = coef @ self.bern  # (T', K) diag G(t), without the (T', K, K) G(t)
        self.smat = geodesic_score_matrix(coef, gdiag_t).contiguous()  # (K, T', 4)
        self.cross = torch.zeros((), dtype=F64, device=r.device)
        self.correct = torch.zeros(self.ts_all.numel(), dtype=torch.int64, device=r.device)
        self.k = g0.shape[0]

    def update(self, c: Pass2Block) -> None:
        self.cross += c.cross
        p0, mixed, pl = c.geodesic  # (K, b) each: u0 Ht0^T, u0 HtL^T + uL Ht0^T, uL HtL^T
        self.correct += geodesic_ncc_correct(self.smat, self.bern, p0.T, mixed.T, pl.T, c.y)

    def apply(self, offsets: PassOffsets) -> None:
        """Add the kernel's once-per-pass correction of the cross term."""
        self.cross += offsets.cross

    def sum_tensors(self) -> list[Tensor]:
        """[cross term (), NCC hits along the curve (T',)] for a distributed all-reduce."""
        return [self.cross, self.correct]

    def compute(self, n: int, lm: LayerMeans, trw: Tensor, per_layer: dict) -> dict[str, Any]:
        """geodesic_err_* per layer, and "curves": {pfc*: (T,)} at ts."""
        curve = geodesic_from_stats(
            self.ts_all,
            n,
            trw[0],
            self.cross,
            trw[-1],
            lm.gram[0],
            lm.x01,
            lm.gram[-1],
            self.correct,
        )
        out: dict[str, Any] = {
            err: (per_layer[key] - curve[key][self.t_count :]).abs()
            for err, key in zip(GEODESIC_ERR_METRICS, PFC_METRICS, strict=True)
        }
        out["curves"] = {key: curve[key][: self.t_count] for key in PFC_METRICS}
        return out


class Classifier:
    """NC3 (self-duality) and NC4 (classifier vs NCC disagreement) of the last layer (docs/metrics.md)."""

    names = (NC3, NC4)

    def __init__(self, weight: Tensor, bias: Tensor | None, lm: LayerMeans) -> None:
        k = weight.shape[0]
        self.w64 = weight.to(device=lm.g[-1].device, dtype=F64)
        b64 = (
            torch.zeros(k, dtype=F64, device=self.w64.device) if bias is None else bias.to(self.w64)
        )
        self.shift = lm.g[-1] @ self.w64.T + b64  # logits = (h - g) W^T + (g W^T + b)
        self.disagree = torch.zeros((), dtype=torch.int64, device=self.w64.device)
        self.k = k

    def update(self, c: Pass2Block) -> None:
        last = c.scores.shape[0] - 1
        logits = c.logits + self.shift.to(c.logits.dtype)[:, None]  # (K, b) class-major
        self.disagree += (logits.argmax(dim=0) != c.ncc_pred(last)).sum()

    def apply(self, offsets: PassOffsets) -> None:
        """Nothing to correct: the logits' centring does not bias a count."""

    def sum_tensors(self) -> list[Tensor]:
        """[classifier vs NCC disagreements ()] for a distributed all-reduce."""
        return [self.disagree]

    def compute(self, n: int, lm: LayerMeans) -> dict[str, Tensor]:
        if not bool(torch.linalg.norm(self.w64) > 0):
            raise MetricInputError("classifier weight is all zeros: NC3 is undefined")
        return {NC3: nc3_from_stats(self.w64, lm.ht[-1]), NC4: self.disagree.to(F64) / n}


# --------------------------------------------------------------------------------------------
# from the other accumulators' results only
# --------------------------------------------------------------------------------------------
class EffectiveDepth:
    """Smallest layer with NCC error 1 - PFC3 <= epsilon (docs/metrics.md; -1: none)."""

    names = (EFFECTIVE_DEPTH,)

    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon

    def compute(self, pfc3: list[float]) -> dict[str, float]:
        return {EFFECTIVE_DEPTH: float(effective_depth([1.0 - v for v in pfc3], self.epsilon))}


class Transport:
    """Theorem 1's sum_k <Htilde^0_k, Htilde^L_k> and Theorem 2's ||Htilde^L - Htilde^0||_F^2."""

    names = (THM1_INNER, TRANSPORT_COST)

    def compute(self, lm: LayerMeans) -> dict[str, Tensor]:
        h0, hl = lm.ht[0], lm.ht[-1]
        return {THM1_INNER: (h0 * hl).sum(), TRANSPORT_COST: (hl - h0).square().sum()}
