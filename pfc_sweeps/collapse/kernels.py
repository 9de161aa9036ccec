"""Pass-2 kernels of the streaming tracker, in two precisions (see docs/precision.md).

The tracker feeds blocks of rows (all layers at once) through one of two kernels. A kernel
does the large (b, d) work in chunks of rows that stay cache resident, and returns the small
per-row statistics of the whole block, so the accumulators pay their per-call overhead once
per block, not once per chunk:

* :class:`ExactKernel` (float64 features, or ``precision="float64"``): every operation in
  float64, as the one-shot functions of :mod:`pfc_sweeps.collapse.metrics` -- the oracle path;
* :class:`FastKernel` (float32, bf16 and fp16 features): the large (B, d) operations run in
  float32 (bf16/fp16 chunks are widened to float32 first: their own 8- or 11-bit mantissas
  would cost 1e-3 relative), and only the small sufficient statistics are float64 --
  (K, d) class sums, (B, K) projections, K x K Grams and traces. The features are centred
  before anything is summed: against a per-layer reference in pass 1 (the mean of the first
  chunk) and against the float32-rounded final class means ``m'_c`` in pass 2, so the rounding
  is relative to the within-class spread, not to ``||h||``. The rounding of ``m'_c`` itself
  is undone exactly in float64 (sums over a class of h - m_c vanish).

Both kernels produce the same :class:`Pass2Block`; the accumulators of
:mod:`pfc_sweeps.collapse.accumulators` never see the precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pfc_sweeps.collapse.metrics import F64
from pfc_sweeps.collapse.stats import cross_within, ncc_correct_from_scores

__all__ = [
    "ExactKernel",
    "FastKernel",
    "LayerMeans",
    "Pass2Block",
    "Routes",
    "Workspace",
    "work_dtype",
]

F32 = torch.float32


def work_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """float64 for float64 features (or precision='float64'), float32 otherwise."""
    return F64 if precision == "float64" or dtype == F64 else F32


class Workspace:
    """Reusable row-chunk buffers of one dtype (fresh large allocations page-fault per chunk)."""

    def __init__(self, rows: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.dim, self.device, self.dtype = rows, dim, device, dtype
        self._bufs: dict[str, Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def get(self, name: str, shape: torch.Size) -> Tensor:
        """Buffer `name` viewed as `shape` (b, d) with b <= rows, d <= dim."""
        key = (name, tuple(shape))
        view = self._views.get(key)
        if view is not None:
            return view
        numel = shape[0] * shape[1]
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel:  # sized to the largest chunk seen
            buf = self._bufs[name] = torch.empty(
                min(self.rows, shape[0]) * self.dim, dtype=self.dtype, device=self.device
            )
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        view = self._views[key] = buf[:numel].view(shape)
        return view

    def load(self, name: str, h: Tensor) -> Tensor:
        """The chunk h (b, d) in the workspace dtype: h itself when it has it, else a copy."""
        if h.dtype == self.dtype and h.is_contiguous():
            return h
        return self.get(name, h.shape).copy_(h)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


@dataclass
class LayerMeans:
    """The final class means of every layer (after pass 1), float64.

    g[i] (d_i,) mean of class means, ht[i] (K, d_i) rows m_c - g, gram (S, K, K) = Ht Ht^T,
    gdiag (S, K); rhs[i] (K + e_i, d_i): Ht[i] then the extra rows layer i is projected on
    (the other end's Ht for the geodesic, the classifier W for NC4); x01 = Ht0 HtL^T or None.
    """

    g: list[Tensor]
    ht: list[Tensor]
    gram: Tensor
    gdiag: Tensor
    rhs: list[Tensor]
    x01: Tensor | None


@dataclass
class Pass2Block:
    """Pass-2 statistics of one block of rows, all layers, float64, class-major (S layers,
    b rows, K classes; the K axis before the row axis, so reductions over classes are fast).

    own (S, K, b) = <h - g, m_c - g>; z (S_g, K, b) = <h - m_y, m_c - g> (NC1's Z^T) of the
    K x K route's layers; scatter[i] (d, d) = sum_i r r^T with r = h - m_y (exact path) or
    h - m'_y (fast path; the tracker adds the exact correction once per pass) of the d x d
    route's layers; rr (S,) = sum_i ||h_i - m_{y_i}||^2; extra[i] (e_i, b) = <h - g, extra rows
    of layer i>; cross = sum_i <h0_i - m0_{y_i}, hL_i - mL_{y_i}> (geodesic only, else None).
    """

    y: Tensor
    own: Tensor
    z: Tensor | None  # (S_g, K, b): the K x K route's layers only (Routes.gram)
    rr: Tensor
    extra: dict[int, Tensor]
    cross: Tensor | None
    gdiag: Tensor  # (S, K) diag G = ||m_c - g||^2
    scatter: dict[int, Tensor]  # layer -> (d, d) sum of r r^T (the d x d route), float64

    def ncc_scores(self) -> Tensor:
        """(K, S, b) ||h - m_c||^2 - ||h - g||^2 = G_cc - 2 <h - g, m_c - g> (fresh tensor)."""
        return torch.addcmul(
            self.gdiag.T[:, :, None], self.own.transpose(0, 1), self.own.new_tensor(-2.0)
        )

    def ncc_correct(self) -> Tensor:
        """(S,) int64: rows whose nearest class mean is their own class, per layer (ties ->
        lowest class index, as argmin)."""
        return ncc_correct_from_scores(self.ncc_scores(), self.y)

    def ncc_pred(self, layer: int) -> Tensor:
        """(b,) NCC prediction of one layer: argmin_c ||h - m_c||^2 (ties -> lowest index)."""
        own = self.own[layer].T  # (b, K)
        return (self.gdiag[layer] - 2.0 * own).argmin(dim=1)


#: device types where the fast path keeps NC1's K x K per-block products in float64 (CPUs:
#: float64 costs them 2x only, and the tables stay as before); elsewhere they are float32
#: (GPUs have 1/2-1/64 of their float32 rate in float64). docs/precision.md.
F64_GRAM_PRODUCTS_ON = ("cpu",)


@dataclass
class Routes:
    """NC1's exact route per layer (docs/metrics.md "NC1 routes"): the d x d within-class
    scatter where d < K (``scatter``), the K x K product Z^T Z otherwise (``gram``)."""

    gram: list[int]
    scatter: list[int]

    @staticmethod
    def of(dims: list[int], num_classes: int) -> Routes:
        """Route of each layer of widths ``dims``."""
        return Routes(
            gram=[i for i, d in enumerate(dims) if d >= num_classes],
            scatter=[i for i, d in enumerate(dims) if d < num_classes],
        )

    def take(self, x: Tensor, n_layers: int) -> Tensor:
        """The K x K route's rows of a per-layer stack (S, ...) (no copy when all are)."""
        return x if len(self.gram) == n_layers else x[self.gram]


class ExactKernel:
    """Pass 2 in float64 (the oracle path): u = h - g, one matmul u rhs^T and one dot per
    layer; ||h - m_y||^2 = ||u||^2 - 2 <u, Ht_y> + G_yy and Z = u Ht^T - G[y] (exact
    identities; rounding ~ eps64 (1 + 1/PFC1) relative)."""

    def __init__(self, lm: LayerMeans, ws: Workspace, geodesic: bool, routes: Routes) -> None:
        self.lm, self.ws, self.geodesic, self.routes = lm, ws, geodesic, routes
        self.rhs = [r.contiguous() for r in lm.rhs]  # (K + e, d)

    def pass2(self, layers: list[Tensor], y: Tensor) -> Pass2Block:
        """One block of rows (all layers), in chunks of at most ``ws.rows`` rows."""
        lm, k, last, n_s = self.lm, self.lm.gram.shape[-1], len(layers) - 1, len(layers)
        projs: list[list[Tensor]] = [[] for _ in layers]  # per layer, per chunk (b, K + e)
        uu = torch.zeros(n_s, dtype=F64, device=y.device)
        cross = torch.zeros((), dtype=F64, device=y.device) if self.geodesic else None
        scatter = {i: lm.ht[i].new_zeros(d, d) for i, d in self._scatter_dims(layers)}
        for s in range(0, y.shape[0], self.ws.rows):
            yc, ends = y[s : s + self.ws.rows], []
            for i, h in enumerate(layers):
                hc = h[s : s + self.ws.rows]
                u = self.ws.get("x0" if i == 0 else "a", hc.shape).copy_(hc).sub_(lm.g[i])
                flat = u.view(-1)  # (b d,)
                uu[i] += torch.dot(flat, flat)
                projs[i].append((self.rhs[i] @ u.T).T)  # (b, K + e); the fast layout
                if i in scatter:  # r = u - Ht_y = h - m_y (b, d)
                    r = torch.index_select(lm.ht[i], 0, yc, out=self.ws.get("r", hc.shape))
                    scatter[i].addmm_(torch.sub(u, r, out=r).T, r)
                if i in (0, last):
                    ends.append(u)
            if cross is not None:
                c01, c10 = projs[0][-1][:, k : 2 * k], projs[last][-1][:, k : 2 * k]
                cross += cross_within(ends[0], ends[-1], c01, c10, lm.x01, yc)
        proj = [torch.cat(p) if len(p) > 1 else p[0] for p in projs]  # (B, K + e) each
        own = torch.stack([p[:, :k] for p in proj])  # (S, B, K)
        extra = {i: p[:, k:].T for i, p in enumerate(proj) if p.shape[1] > k}  # (e_i, B)
        gy = lm.gram.index_select(1, y)  # (S, B, K) rows G[y_i]
        col = y.view(1, -1, 1).expand(n_s, -1, 1)
        rr = uu - 2.0 * own.gather(2, col).sum((1, 2)) + gy.gather(2, col).sum((1, 2))
        take = self.routes.take
        z = (take(own, n_s) - take(gy, n_s)).transpose(1, 2) if self.routes.gram else None
        return Pass2Block(y, own.transpose(1, 2), z, rr, extra, cross, lm.gdiag, scatter)

    def _scatter_dims(self, layers: list[Tensor]) -> list[tuple[int, int]]:
        return [(i, layers[i].shape[1]) for i in self.routes.scatter]

    def scatter_offset(self, i: int, counts: Tensor) -> Tensor | None:
        """What to add to layer i's summed scatter once per pass (nothing: r = h - m_y)."""
        return None


class FastKernel:
    """Pass 2 in float32 with float64 statistics: r = h - m'_y (m' = float32 class means),
    q = rhs r^T (float32 matmul), then in float64 <h - g, .> = q + ((m' - g) rhs^T)[y] and
    <h - m_y, Ht_c> = q + (delta Ht^T)[y], delta = m' - m; ||h - m_y||^2 summed over a class
    = sum ||r||^2 - n_y ||delta_y||^2 (exact: the residuals of a class sum to zero)."""

    def __init__(self, lm: LayerMeans, ws: Workspace, geodesic: bool, routes: Routes) -> None:
        self.lm, self.ws, self.geodesic, self.routes = lm, ws, geodesic, routes
        self.k = k = lm.gram.shape[-1]
        self.ref32, self.rhs32, shift, dz, dn2, deltas = [], [], [], [], [], []
        for i, (g, ht, rhs) in enumerate(zip(lm.g, lm.ht, lm.rhs, strict=True)):
            ref32 = (ht + g).to(F32)  # (K, d) m'_c
            delta = ref32.to(F64) - (ht + g)  # (K, d) m' - m, exact in float64
            self.ref32.append(ref32)
            self.rhs32.append(rhs.to(F32).contiguous())  # (K + e, d)
            shift.append((ref32.to(F64) - g) @ rhs.T)  # (K, K + e)
            if i in routes.gram:  # (K, K) the K x K route's correction of Z
                dz.append(delta @ ht.T)
            dn2.append(delta.square().sum(1))  # (K,)
            deltas.append(delta)
        self.width = max(r.shape[0] for r in self.rhs32)  # rows of the widest rhs
        # shifts indexed [.., column c, row class y] so that index_select(-1, y) is class-major
        self.shift_own = torch.stack([s[:, :k].T for s in shift]).contiguous()  # (S, K, K)
        self.shift_extra = {
            i: s[:, k:].T.contiguous() for i, s in enumerate(shift) if s.shape[1] > k
        }
        self.dz = (  # (S_g, K, K)
            torch.stack(dz).transpose(1, 2).contiguous() if dz else lm.gram.new_zeros(0, k, k)
        )
        self.dn2 = torch.stack(dn2)  # (S, K)
        self.deltas = {i: deltas[i] for i in routes.scatter}  # (K, d) m' - m
        self.z_dtype = F64 if lm.gram.device.type in F64_GRAM_PRODUCTS_ON else F32
        self.dz_z = self.dz.to(self.z_dtype)
        # (K,) <delta0_c, deltaL_c> (geodesic: layers 0 and L share one width)
        self.dd = (deltas[0] * deltas[-1]).sum(1) if geodesic else None

    def scatter_offset(self, i: int, counts: Tensor) -> Tensor:
        """-sum_c n_c delta_c delta_c^T (d, d): makes layer i's summed r r^T (r = h - m'_y)
        the scatter of h - m_y, exactly (the residuals of a class sum to -n_c delta_c)."""
        delta = self.deltas[i]  # (K, d)
        return -(delta.T * counts) @ delta

    def _chunk(
        self, layers: list[Tensor], y: Tensor, s: int, scatter: dict[int, Tensor]
    ) -> tuple[Tensor, ...]:
        """One chunk, rows s..: q (S, width, b) = rhs r^T, ||r|| (S, b)[, <r0, rL> (b,)];
        adds r^T r (float32 product, float64 sum) into scatter[i] for the d x d route."""
        n_s, e = len(layers), min(s + self.ws.rows, y.shape[0])
        yc = y[s:e]
        q32 = torch.empty(n_s, self.width, e - s, dtype=F32, device=y.device)
        sq = torch.empty(n_s, e - s, dtype=F32, device=y.device)
        r0 = r = None
        for i, h in enumerate(layers):
            r = self.ws.get("x0" if i == 0 else "a", (e - s, h.shape[1]))  # (b, d) float32
            torch.index_select(self.ref32[i], 0, yc, out=r)
            torch.sub(h[s:e], r, out=r)  # h - m'_y (one rounding)
            torch.linalg.vector_norm(r, dim=1, out=sq[i])
            rhs = self.rhs32[i]  # (K + e, d) @ (d, b): the fast layout on CPU
            torch.mm(rhs, r.T, out=q32[i, : rhs.shape[0]])
            if i in scatter:
                scatter[i] += torch.mm(r.T, r)  # (d, d): centred rows, float32 product
            r0 = r if i == 0 else r0
        if self.geodesic:
            return q32, sq, torch.linalg.vecdot(r0, r, dim=1)  # (b,)
        return q32, sq

    def pass2(self, layers: list[Tensor], y: Tensor) -> Pass2Block:
        """One block of rows (all layers): the (b, d) work in chunks of ``ws.rows`` rows,
        the float64 statistics once per block."""
        k, n_s = self.k, len(layers)
        scatter = {i: self.lm.ht[i].new_zeros(d, d) for i, d in self._scatter_dims(layers)}
        parts = [self._chunk(layers, y, s, scatter) for s in range(0, y.shape[0], self.ws.rows)]
        q32, sq, *dots = (
            torch.cat(p, dim=-1) if len(parts) > 1 else p[0] for p in zip(*parts, strict=True)
        )
        # q32 (S, width, B): only the first K + e_i rows of layer i are set; widen to float64
        # only the rows that are used (the K rows of every layer, the e_i extra rows of i)
        qk = q32[:, :k].to(F64)  # (S, K, B)
        z = None
        if self.routes.gram:  # (S_g, K, B) <h - m_y, m_c - g>: centred, float32 products
            qz = self.routes.take(qk if self.z_dtype == F64 else q32[:, :k], n_s)
            z = qz + self.dz_z.index_select(2, y)
        own = qk.add_(self.shift_own.index_select(2, y))  # (S, K, B) <h - g, m_c - g>
        rr = sq.to(F64).square().sum(1) - self.dn2.index_select(1, y).sum(1)  # (S,)
        extra = {
            i: q32[i, k : k + sh.shape[0]].to(F64) + sh.index_select(1, y)  # (e_i, B)
            for i, sh in self.shift_extra.items()
        }
        cross = None
        if self.geodesic:  # sum <r0, rL> - sum_i <delta0_y, deltaL_y>
            cross = dots[0].to(F64).sum() - self.dd.index_select(0, y).sum()
        return Pass2Block(y, own, z, rr, extra, cross, self.lm.gdiag, scatter)

    _scatter_dims = ExactKernel._scatter_dims
