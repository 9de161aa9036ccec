"""Per-chunk kernels of the streaming tracker, in two precisions (see docs/precision.md).

The tracker feeds every row chunk of every layer through one of two kernels:

* :class:`ExactKernel` (float64 features, or ``precision="float64"``): every operation in
  float64, as the one-shot functions of :mod:`pfc_sweeps.metrics` -- the oracle path;
* :class:`FastKernel` (float32, bf16 and fp16 features): the large (B, d) operations run in
  float32 (bf16/fp16 chunks are widened to float32 first: their own 8- or 11-bit mantissas
  would cost 1e-3 relative), and only the small sufficient statistics are float64 --
  (K, d) class sums, (B, K) projections, K x K Grams and traces. The features are centred
  before anything is summed: against a per-layer reference in pass 1 (the mean of the first
  chunk) and against the float32-rounded final class means ``m'_c`` in pass 2, so the rounding
  is relative to the within-class spread, not to ``||h||``. The rounding of ``m'_c`` itself
  is undone exactly in float64 (sums over a class of h - m_c vanish).

Both kernels produce the same :class:`Pass2Chunk`; the accumulators of
:mod:`pfc_sweeps.accumulators` never see the precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pfc_sweeps.metrics import F64, cross_within

__all__ = ["ExactKernel", "FastKernel", "LayerMeans", "Pass2Chunk", "Workspace", "work_dtype"]

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
class Pass2Chunk:
    """Pass-2 statistics of one row chunk, all layers, float64 (S layers, b rows, K classes).

    own (S, b, K) = <h - g, m_c - g>; z (S, b, K) = <h - m_y, m_c - g> (rows of Z, NC1);
    rr (S,) = sum_i ||h_i - m_{y_i}||^2; extra[i] (b, e_i) = <h - g, extra rows of layer i>;
    cross = sum_i <h0_i - m0_{y_i}, hL_i - mL_{y_i}> (geodesic only, else None).
    """

    y: Tensor
    own: Tensor
    z: Tensor
    rr: Tensor
    extra: dict[int, Tensor]
    cross: Tensor | None
    gdiag: Tensor  # (S, K) diag G = ||m_c - g||^2

    @property
    def pred(self) -> Tensor:
        """NCC prediction (S, b): argmin_c ||h - m_c||^2 (ties -> lowest class index)."""
        if self._pred is None:
            self._pred = (self.gdiag[:, None, :] - 2.0 * self.own).argmin(dim=2)
        return self._pred

    def __post_init__(self) -> None:
        self._pred: Tensor | None = None


class ExactKernel:
    """Pass 2 in float64 (the oracle path): u = h - g, one matmul u rhs^T and one dot per
    layer; ||h - m_y||^2 = ||u||^2 - 2 <u, Ht_y> + G_yy and Z = u Ht^T - G[y] (exact
    identities; rounding ~ eps64 (1 + 1/PFC1) relative)."""

    def __init__(self, lm: LayerMeans, ws: Workspace, geodesic: bool) -> None:
        self.lm, self.ws, self.geodesic = lm, ws, geodesic
        self.rhs = [r.contiguous() for r in lm.rhs]  # (K + e, d)

    def pass2(self, layers: list[Tensor], y: Tensor) -> Pass2Chunk:
        lm, k, last = self.lm, self.lm.gram.shape[-1], len(layers) - 1
        own = torch.empty(len(layers), y.shape[0], k, dtype=F64, device=y.device)
        uu, extra, ends = [], {}, []
        for i, h in enumerate(layers):
            u = self.ws.get("x0" if i == 0 else "a", h.shape).copy_(h).sub_(lm.g[i])  # (b, d)
            flat = u.view(-1)
            uu.append(torch.dot(flat, flat))
            proj = (self.rhs[i] @ u.T).T  # (b, K + e); (K + e, d) @ (d, b) is the fast layout
            own[i] = proj[:, :k]
            if proj.shape[1] > k:
                extra[i] = proj[:, k:]
            if i in (0, last):
                ends.append(u)
        gy = lm.gram.index_select(1, y)  # (S, b, K) rows G[y_i]
        col = y.view(1, -1, 1).expand(len(layers), -1, 1)
        rr = torch.stack(uu) - 2.0 * own.gather(2, col).sum((1, 2)) + gy.gather(2, col).sum((1, 2))
        cross = None
        if self.geodesic:
            c01, c10 = extra[0][:, :k], extra[last][:, :k]
            cross = cross_within(ends[0], ends[-1], c01, c10, lm.x01, y)
        return Pass2Chunk(y, own, own - gy, rr, extra, cross, lm.gdiag)


class FastKernel:
    """Pass 2 in float32 with float64 statistics: r = h - m'_y (m' = float32 class means),
    q = rhs r^T (float32 matmul), then in float64 <h - g, .> = q + ((m' - g) rhs^T)[y] and
    <h - m_y, Ht_c> = q + (delta Ht^T)[y], delta = m' - m; ||h - m_y||^2 summed over a class
    = sum ||r||^2 - n_y ||delta_y||^2 (exact: the residuals of a class sum to zero)."""

    def __init__(self, lm: LayerMeans, ws: Workspace, geodesic: bool) -> None:
        self.lm, self.ws, self.geodesic = lm, ws, geodesic
        self.k = k = lm.gram.shape[-1]
        self.ref32, self.rhs32, shift, dz, dn2, deltas = [], [], [], [], [], []
        for g, ht, rhs in zip(lm.g, lm.ht, lm.rhs, strict=True):
            ref32 = (ht + g).to(F32)  # (K, d) m'_c
            delta = ref32.to(F64) - (ht + g)  # (K, d) m' - m, exact in float64
            self.ref32.append(ref32)
            self.rhs32.append(rhs.to(F32).contiguous())  # (K + e, d)
            shift.append((ref32.to(F64) - g) @ rhs.T)  # (K, K + e)
            dz.append(delta @ ht.T)  # (K, K)
            dn2.append(delta.square().sum(1))  # (K,)
            deltas.append(delta)
        self.shift_own = torch.stack([s[:, :k] for s in shift])  # (S, K, K)
        self.shift_extra = {i: s[:, k:] for i, s in enumerate(shift) if s.shape[1] > k}
        self.dz = torch.stack(dz)  # (S, K, K)
        self.dn2 = torch.stack(dn2)  # (S, K)
        self.dd = (deltas[0] * deltas[-1]).sum(1)  # (K,) <delta0_c, deltaL_c> (geodesic)

    def pass2(self, layers: list[Tensor], y: Tensor) -> Pass2Chunk:
        k, last, n_s, b = self.k, len(layers) - 1, len(layers), y.shape[0]
        q32 = torch.empty(n_s, k, b, dtype=F32, device=y.device)  # (S, K, b) Ht r^T
        sq = torch.empty(n_s, b, dtype=F32, device=y.device)  # (S, b) ||r||^2 rows
        extra, ends = {}, []
        for i, h in enumerate(layers):
            r = self.ws.get("x0" if i == 0 else "a", h.shape)  # (b, d) float32
            torch.index_select(self.ref32[i], 0, y, out=r)
            torch.sub(h, r, out=r)  # h - m'_y (one rounding)
            torch.linalg.vector_norm(r, dim=1, out=sq[i])
            if self.rhs32[i].shape[0] == k:  # (K, d) @ (d, b): the fast layout on CPU
                torch.mm(self.rhs32[i], r.T, out=q32[i])
            else:
                q = self.rhs32[i] @ r.T  # (K + e, b)
                q32[i] = q[:k]
                extra[i] = q[k:].T.to(F64) + self.shift_extra[i].index_select(0, y)
            if i in (0, last):
                ends.append(r)
        q = q32.transpose(1, 2).to(F64)  # (S, b, K)
        own = q + self.shift_own[:, y]
        z = q + self.dz[:, y]
        rr = sq.to(F64).square().sum(1) - self.dn2[:, y].sum(1)  # (S,)
        cross = None
        if self.geodesic:  # sum <r0, rL> - sum_i <delta0_y, deltaL_y>
            dots = torch.linalg.vecdot(ends[0], ends[-1], dim=1).to(F64)  # (b,)
            cross = dots.sum() - self.dd.index_select(0, y).sum()
        return Pass2Chunk(y, own, z, rr, extra, cross, self.lm.gdiag)
