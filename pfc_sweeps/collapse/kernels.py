"""Pass-2 kernels of the streaming tracker, in two precisions (see docs/precision.md).

The tracker feeds blocks of rows (all layers at once) through one of two kernels. A kernel
does the large (b, d) work in chunks of rows that stay cache resident, and returns the small
per-row statistics of the whole block, so the accumulators pay their per-call overhead once
per block, not once per chunk:

* :class:`ExactKernel` (float64 features, or ``precision="float64"``): every operation in
  float64, as the one-shot functions of :mod:`pfc_sweeps.collapse.metrics` -- the oracle path;
* :class:`FastKernel` (float32, bf16 and fp16 features): the per-row operations -- (B, d)
  residuals, (B, K) projections and NCC scores -- run in float32 (bf16/fp16 chunks are
  widened to float32 first: their own 8- or 11-bit mantissas would cost 1e-3 relative), and
  only the sums are float64 -- (K, d) class sums, K x K and d x d products, traces. The
  features are centred before anything is summed: against a per-layer reference in pass 1
  (the mean of the first chunk) and against the float32-rounded final class means ``m'_c``
  in pass 2, so the rounding is relative to the within-class spread, not to ``||h||``. The
  rounding of ``m'_c`` itself is undone exactly in float64, once per pass
  (:class:`PassOffsets`: the residuals of a class sum to -n_c (m'_c - m_c)).

Both kernels produce the same :class:`Pass2Block` (scores in the work dtype); the
accumulators of :mod:`pfc_sweeps.collapse.accumulators` never see the precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pfc_sweeps.collapse.inputs import GEMM_ROW_ALIGN, even_sizes
from pfc_sweeps.collapse.metrics import F64
from pfc_sweeps.collapse.stats import (
    add_upper_gram_,
    cross_within,
    gram_edges,
    mirror_upper_,
    ncc_correct_from_scores,
    sym_gram,
)

F32 = torch.float32

__all__ = [
    "ExactKernel",
    "FastKernel",
    "LayerMeans",
    "Pass2Block",
    "PassOffsets",
    "Routes",
    "Workspace",
    "gram_products_dtype",
    "work_dtype",
]


def work_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """float64 for float64 features (or precision='float64'), float32 otherwise."""
    return F64 if precision == "float64" or dtype == F64 else F32


class Workspace:
    """Reusable row-chunk buffers of one dtype (fresh large allocations page-fault per chunk)."""

    def __init__(self, rows: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows, self.dim, self.device, self.dtype = rows, dim, device, dtype
        self._bufs: dict[str, Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...]], Tensor] = {}
        self._blocks: dict[tuple[str, torch.dtype], Tensor] = {}

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

    def block(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = F32) -> Tensor:
        """Scratch tensor `name` of any shape (a block's per-row statistics), reused from block
        to block; valid until `name` is asked for again."""
        numel = math.prod(shape)
        buf = self._blocks.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._blocks[name, dtype] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        bufs = (*self._bufs.values(), *self._blocks.values())
        return sum(b.numel() * b.element_size() for b in bufs)


@dataclass
class LayerMeans:
    """The final class means of every layer (after pass 1), float64.

    g[i] (d_i,) mean of class means, ht[i] (K, d_i) rows m_c - g, gram (S, K, K) = Ht Ht^T,
    gdiag (S, K); x01 = Ht0 HtL^T or None; w (K_w, d_L) the classifier's weight or None.
    """

    g: list[Tensor]
    ht: list[Tensor]
    gram: Tensor
    gdiag: Tensor
    x01: Tensor | None
    w: Tensor | None = None


@dataclass
class Pass2Block:
    """Pass-2 statistics of one block of rows, all layers (S layers, b rows, K classes),
    class-major (the K axis before the row axis, so reductions over classes are fast).

    scores (S, K, b) NCC scores ||h - m_c||^2 - ||h - g||^2 = G_cc - 2 <h - g, m_c - g>
    (work dtype); z (S_g, K, b) = <h - m_y, m_c - g> (NC1's Z^T) of the K x K route's layers;
    rr (S,) = sum_i ||h_i - m_{y_i}||^2; geodesic (p0, mixed, pL), each (K, b):
    <h0 - g0, Ht0_c>, <h0 - g0, HtL_c> + <hL - gL, Ht0_c>, <hL - gL, HtL_c> (or None);
    logits (K_w, b) = <hL - gL, W_c> (the classifier's, up to the per-class shift; or None);
    cross = sum_i <h0_i - m0_{y_i}, hL_i - mL_{y_i}> (geodesic only, else None). The fast
    kernel's rr, z and cross are those of r = h - m'_y; the tracker adds the exact correction
    once per pass (:meth:`FastKernel.offsets`).
    """

    y: Tensor
    scores: Tensor
    z: Tensor | None
    rr: Tensor
    geodesic: tuple[Tensor, Tensor, Tensor] | None
    logits: Tensor | None
    cross: Tensor | None

    def ncc_correct(self) -> Tensor:
        """(S,) int64: rows whose nearest class mean is their own class, per layer (ties ->
        lowest class index, as argmin). ``scores`` is left as it was."""
        scores = self.scores.transpose(0, 1)  # (K, S, b)
        idx = self.y.view(1, 1, -1).expand(1, scores.shape[1], -1)
        own = scores.gather(0, idx)
        correct = ncc_correct_from_scores(scores, self.y)  # writes inf into the own slots
        scores.scatter_(0, idx, own)
        return correct

    def ncc_pred(self, layer: int) -> Tensor:
        """(b,) NCC prediction of one layer: argmin_c ||h - m_c||^2 (ties -> lowest index)."""
        return self.scores[layer].argmin(dim=0)


@dataclass
class PassOffsets:
    """What the fast kernel adds to the summed pass-2 statistics once per pass (after any
    all-reduce), from the class counts: the exact correction of centring at m' = float32
    class means instead of m (the residuals of class c sum to -n_c delta_c, delta = m' - m).
    rr (S,), zz (S_g, K, K), scatter {layer: (d, d)}, cross () or None; float64."""

    rr: Tensor
    zz: Tensor
    scatter: dict[int, Tensor]
    cross: Tensor | None


#: device types where the fast path forms NC1's K x K per-block products Z^T Z in float64 for
#: up to F64_GRAM_PRODUCTS_MAX_K classes: there they cost a few per cent of the pass (K^2 of
#: K d per row, at half the float32 rate) and NC1 keeps ~4e-7 of the float64 oracle instead
#: of ~4e-6. Above, and on accelerators (1/2 to 1/64 of their float32 rate in float64), they
#: are float32 per block, summed in float64. docs/precision.md "NC1's products".
F64_GRAM_PRODUCTS_ON = ("cpu",)
F64_GRAM_PRODUCTS_MAX_K = 32


def gram_products_dtype(device: torch.device, num_classes: int) -> torch.dtype:
    """dtype of the fast path's per-block products Z^T Z (F64_GRAM_PRODUCTS_ON/_MAX_K)."""
    f64 = device.type in F64_GRAM_PRODUCTS_ON and num_classes <= F64_GRAM_PRODUCTS_MAX_K
    return F64 if f64 else F32


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


def _take(scatter: dict[int, Tensor], edges: dict[int, list[int]]) -> dict[int, Tensor]:
    """The summed scatters (upper block triangles, :func:`add_upper_gram_`) made whole, each
    replaced by a zero one for what follows."""
    out = {i: mirror_upper_(s, edges[i]) for i, s in scatter.items()}
    for i, s in out.items():
        scatter[i] = torch.zeros_like(s)
    return out


def _exact_rhs(lm: LayerMeans, geodesic: bool) -> list[Tensor]:
    """The exact kernel's right-hand side per layer (K + e_i, d_i): Ht[i], then the rows
    layer i is also projected on: with the geodesic, layer 0 on HtL and layer L on Ht0 (the
    cross terms); with a classifier, layer L on W (NC4)."""
    rhs, last = list(lm.ht), len(lm.ht) - 1
    if geodesic:
        rhs[0], rhs[last] = torch.cat([lm.ht[0], lm.ht[last]]), torch.cat([lm.ht[last], lm.ht[0]])
    if lm.w is not None:
        rhs[last] = torch.cat([rhs[last], lm.w])
    return [r.contiguous() for r in rhs]


class ExactKernel:
    """Pass 2 in float64 (the oracle path): u = h - g, one matmul u rhs^T and one dot per
    layer; ||h - m_y||^2 = ||u||^2 - 2 <u, Ht_y> + G_yy and Z = u Ht^T - G[y] (exact
    identities; rounding ~ eps64 (1 + 1/PFC1) relative). The d x d route's scatter of
    r = h - m_y is summed in float64 (:meth:`take_scatter`)."""

    def __init__(self, lm: LayerMeans, ws: Workspace, geodesic: bool, routes: Routes) -> None:
        self.lm, self.ws, self.geodesic, self.routes = lm, ws, geodesic, routes
        self.rhs = _exact_rhs(lm, geodesic)  # (K + e, d) per layer
        self.scatter = {i: lm.ht[i].new_zeros(lm.ht[i].shape[1], lm.ht[i].shape[1])
                        for i in routes.scatter}  # fmt: skip
        self.edges = {i: gram_edges(s.shape[0]) for i, s in self.scatter.items()}

    @property
    def row_elements(self) -> int:
        """float64 elements of per-row statistics a block holds: (S, K + e) projections."""
        return len(self.rhs) * max(r.shape[0] for r in self.rhs)

    def pass2(self, layers: list[Tensor], y: Tensor) -> Pass2Block:
        """One block of rows (all layers), in chunks of at most ``ws.rows`` rows."""
        lm, k, last, n_s = self.lm, self.lm.gram.shape[-1], len(layers) - 1, len(layers)
        projs: list[list[Tensor]] = [[] for _ in layers]  # per layer, per chunk (b, K + e)
        uu = torch.zeros(n_s, dtype=F64, device=y.device)
        cross = torch.zeros((), dtype=F64, device=y.device) if self.geodesic else None
        for s in range(0, y.shape[0], self.ws.rows):
            yc, ends = y[s : s + self.ws.rows], []
            for i, h in enumerate(layers):
                hc = h[s : s + self.ws.rows]
                u = self.ws.get("x0" if i == 0 else "a", hc.shape).copy_(hc).sub_(lm.g[i])
                flat = u.view(-1)  # (b d,)
                uu[i] += torch.dot(flat, flat)
                projs[i].append((self.rhs[i] @ u.T).T)  # (b, K + e); the fast layout
                if i in self.scatter:  # r = u - Ht_y = h - m_y (b, d)
                    r = torch.index_select(lm.ht[i], 0, yc, out=self.ws.get("r", hc.shape))
                    add_upper_gram_(self.scatter[i], torch.sub(u, r, out=r), self.edges[i])
                if i in (0, last):
                    ends.append(u)
            if cross is not None:
                c01, c10 = projs[0][-1][:, k : 2 * k], projs[last][-1][:, k : 2 * k]
                cross += cross_within(ends[0], ends[-1], c01, c10, lm.x01, yc)
        proj = [torch.cat(p) if len(p) > 1 else p[0] for p in projs]  # (B, K + e) each
        own = torch.stack([p[:, :k] for p in proj])  # (S, B, K)
        gy = lm.gram.index_select(1, y)  # (S, B, K) rows G[y_i]
        col = y.view(1, -1, 1).expand(n_s, -1, 1)
        rr = uu - 2.0 * own.gather(2, col).sum((1, 2)) + gy.gather(2, col).sum((1, 2))
        take = self.routes.take
        z = (take(own, n_s) - take(gy, n_s)).transpose(1, 2) if self.routes.gram else None
        scores = torch.addcmul(lm.gdiag[:, None, :], own, own.new_tensor(-2.0)).transpose(1, 2)
        geo = None
        if self.geodesic:
            mixed = (proj[0][:, k : 2 * k] + proj[last][:, k : 2 * k]).T  # (K, B)
            geo = (own[0].T, mixed, own[last].T)
        logits = proj[last][:, -lm.w.shape[0] :].T if lm.w is not None else None  # (K_w, B)
        return Pass2Block(y, scores, z, rr, geo, logits, cross)

    def take_scatter(self) -> dict[int, Tensor]:
        """The d x d route's summed scatters of this pass so far, float64 (then reset)."""
        return _take(self.scatter, self.edges)

    def offsets(self, counts: Tensor) -> PassOffsets | None:
        """Nothing to correct: r = h - m_y."""
        return None


#: the fast kernel's float32 d x d scatters are flushed into float64 after this many rows
#: (docs/precision.md "NC1's products")
SCATTER_FLUSH_ROWS = 4096


class FastKernel:
    """Pass 2 in float32, float64 sums. Per row and layer: r = h - m'_y (m' = float32 class
    means) for ||r||^2 and NC1, and a float32 GEMM projection q on Ht. The K x K route's
    layers project r (NC1's Z must be centred; the NCC scores (G_cc - 2 G[y])_c - 2 q then
    need one row gather), the d x d route's project u = h - g' (scores G_cc - 2 q, no
    gather). With the geodesic, one more projection of x0 + xL on Ht0 + HtL gives the mixed
    terms. Sums of ||r||^2, Z^T Z, r r^T and <r0, rL> are float64, corrected once per pass
    (:meth:`offsets`)."""

    def __init__(self, lm: LayerMeans, ws: Workspace, geodesic: bool, routes: Routes) -> None:
        self.lm, self.ws, self.geodesic, self.routes = lm, ws, geodesic, routes
        self.k = k = lm.gram.shape[-1]
        n_s, last = len(lm.g), len(lm.g) - 1
        means = [ht + g for g, ht in zip(lm.g, lm.ht, strict=True)]  # (K, d) float64
        self.ref32 = [m.to(F32) for m in means]  # (K, d) m'_c
        self.g32 = [g.to(F32) for g in lm.g]  # (d,) g'
        # m' - m (K, d), formed in float64, kept in float32: the corrections are O(u^2)
        self.deltas = [(r.to(F64) - m).to(F32) for r, m in zip(self.ref32, means, strict=True)]
        self.ht32 = [ht.to(F32) for ht in lm.ht]  # (K, d)
        self.gdiag32 = lm.gdiag.to(F32)[:, :, None]  # (S, K, 1)
        g = routes.gram  # score table (K_y, S_g * K): a[y, j, c] = G_cc - 2 G[y, c], layer g[j]
        a32 = torch.empty(k, len(g), k, dtype=F32, device=lm.gram.device)
        a32.copy_(routes.take(lm.gram, n_s).transpose(0, 1)).mul_(-2.0)
        self.a32 = a32.add_(routes.take(lm.gdiag, n_s).to(F32)).view(k, -1)
        self._last = last if n_s > 1 else 0
        self.centred_ends = self._last in g
        self.sum32 = self.mx32 = self.w32 = self.hw32 = None
        if geodesic:  # <x0 + xL, Ht0 + HtL> - q0 - qL = the mixed terms of x
            self.sum32 = (lm.ht[0] + lm.ht[last]).to(F32)
            self.mx32 = (lm.x01 + lm.x01.T).to(F32) if self.centred_ends else None  # (K_y, K)
        if lm.w is not None:  # the classifier's W (K_w, d); for x = r, shifts <m_y - g, W_c>
            self.w32 = lm.w.to(F32)
            self.hw32 = self.ht32[last] @ self.w32.T if self.centred_ends else None
        self.scatter32 = {i: self.ht32[i].new_zeros(self.ht32[i].shape[1], self.ht32[i].shape[1])
                          for i in routes.scatter}  # fmt: skip
        self._scatter_rows = 0
        self.scatter = {i: lm.ht[i].new_zeros(self.scatter32[i].shape) for i in routes.scatter}
        self.edges = {i: gram_edges(s.shape[0]) for i, s in self.scatter.items()}
        self.z_dtype = gram_products_dtype(lm.gram.device, k)

    @property
    def row_elements(self) -> int:
        """Per-row statistics a block holds, in float64 elements: float32 projections, scores
        and gathered table rows (3 S K), extra rows (<= 2 K), float64 Z (2 S_g K on CPU)."""
        n_s, n_g = len(self.ref32), len(self.routes.gram) if self.z_dtype == F64 else 0
        return (3 * n_s + 2) * self.k // 2 + 2 * n_g * self.k

    def _outputs(self, n_s: int, b: int) -> dict[str, Tensor]:
        """The block's per-row outputs (reused workspace tensors): q (S, K, b), ||r|| (S, b),
        with the geodesic qsum (K, b) and dot (b,), with a classifier logits (K_w, b)."""
        ws, k = self.ws, self.k
        out = {"q": ws.block("q", (n_s, k, b)), "sq": ws.block("sq", (n_s, b))}
        if self.geodesic:
            out |= {"qsum": ws.block("qsum", (k, b)), "dot": ws.block("dot", (b,))}
        if self.w32 is not None:
            out["logits"] = ws.block("logits", (self.w32.shape[0], b))
        return out

    def _chunk(self, layers: list[Tensor], y: Tensor, cols: slice, out: dict[str, Tensor]) -> None:
        """Rows ``cols`` of one block into the same columns of ``out``: q = Ht x^T (x = r or
        u by route), ||r||, then with the geodesic <x0 + xL, Ht0 + HtL> and <r0, rL>, with a
        classifier W xL^T; adds r^T r into the float32 scatters of the d x d route."""
        s, e = cols.start, cols.stop
        yc, ws = y[s:e], self.ws
        r0 = x0 = r = x = None
        for i, h in enumerate(layers):
            shape = (e - s, h.shape[1])
            r = ws.get("x0" if i == 0 else "a", shape)  # (b, d) float32
            torch.index_select(self.ref32[i], 0, yc, out=r)
            torch.sub(h[s:e], r, out=r)  # h - m'_y (one rounding)
            torch.linalg.vector_norm(r, dim=1, out=out["sq"][i, cols])
            if i in self.scatter32:
                add_upper_gram_(self.scatter32[i], r, self.edges[i])  # (d, d): centred, float32
                x = torch.sub(h[s:e], self.g32[i], out=ws.get("u0" if i == 0 else "u", shape))
            else:
                x = r
            torch.mm(self.ht32[i], x.T, out=out["q"][i, :, cols])  # (K, d) @ (d, b): fast on CPU
            r0, x0 = (r, x) if i == 0 else (r0, x0)
        if self.geodesic:
            v = torch.add(x0, x, out=ws.get("v", x.shape))
            torch.mm(self.sum32, v.T, out=out["qsum"][:, cols])
            torch.linalg.vecdot(r0, r, dim=1, out=out["dot"][cols])
        if self.w32 is not None:
            torch.mm(self.w32, x.T, out=out["logits"][:, cols])

    def pass2(self, layers: list[Tensor], y: Tensor) -> Pass2Block:
        """One block of rows (all layers): the (b, d) work in chunks of ``ws.rows`` rows,
        the float64 sums once per block. The block's tensors are workspace tensors, valid
        until the next call."""
        n_s, last, b = len(layers), self._last, y.shape[0]
        out = self._outputs(n_s, b)
        s = 0
        for size in even_sizes(b, self.ws.rows, GEMM_ROW_ALIGN):
            self._chunk(layers, y, slice(s, s + size), out)
            s += size
        self._count_scatter_rows(b)
        q = out["q"]
        z = self.routes.take(q, n_s) if self.routes.gram else None  # (S_g, K, B) centred
        if z is not None and self.z_dtype == F64:  # NC1's K x K products in float64
            z = self.ws.block("z", z.shape, F64).copy_(z)  # (F64_GRAM_PRODUCTS_ON)
        geo = cross = logits = None
        if self.geodesic:
            mixed = out["qsum"].sub_(q[0]).sub_(q[last])  # (K, B)
            if self.mx32 is not None:
                mixed.add_(self.mx32.index_select(0, y).T)
            cross = out["dot"].to(F64).sum()
        if self.w32 is not None:
            logits = out["logits"]  # (K_w, B)
            if self.hw32 is not None:
                logits.add_(self.hw32.index_select(0, y).T)
        scores = self._scores(q, z is q, y)
        if self.geodesic:  # <h - g, Ht_c> = (G_cc - score_c) / 2 at both ends
            ends = [
                torch.sub(self.gdiag32[i], scores[i], out=self.ws.block(f"end{i}", (self.k, b)))
                .mul_(0.5) for i in (0, last)
            ]  # fmt: skip
            geo = (ends[0], mixed, ends[1])
        rr = out["sq"].to(F64).square().sum(1)  # (S,)
        return Pass2Block(y, scores, z, rr, geo, logits, cross)

    def _scores(self, q: Tensor, keep: bool, y: Tensor) -> Tensor:
        """(S, K, B) NCC scores from the projections: G_cc - 2 q on the d x d route's layers
        (q of u), (G_cc - 2 G[y])_c - 2 q on the K x K route's (q of r; one row gather).
        Written over q unless ``keep`` (q is also NC1's Z)."""
        scores = self.ws.block("scores", q.shape) if keep else q
        gram, n_s = self.routes.gram, q.shape[0]
        if not gram:
            return torch.add(self.gdiag32, q, alpha=-2.0, out=scores)
        rows = self.ws.block("shift", (y.shape[0], self.a32.shape[1]))
        torch.index_select(self.a32, 0, y, out=rows)
        shift = rows.view(-1, len(gram), self.k).permute(1, 2, 0)  # (S_g, K, B)
        if len(gram) == n_s:
            return torch.add(shift, q, alpha=-2.0, out=scores)
        for j, i in enumerate(gram):
            torch.add(shift[j], q[i], alpha=-2.0, out=scores[i])
        for i in self.routes.scatter:
            torch.add(self.gdiag32[i], q[i], alpha=-2.0, out=scores[i])
        return scores

    def _count_scatter_rows(self, rows: int) -> None:
        self._scatter_rows += rows
        if self._scatter_rows >= SCATTER_FLUSH_ROWS:
            self._flush_scatter()

    def _flush_scatter(self) -> None:
        for i, s32 in self.scatter32.items():
            self.scatter[i] += s32
            s32.zero_()
        self._scatter_rows = 0

    def take_scatter(self) -> dict[int, Tensor]:
        """The d x d route's summed scatters of r = h - m'_y so far, float64 (then reset)."""
        self._flush_scatter()
        return _take(self.scatter, self.edges)

    def offsets(self, counts: Tensor) -> PassOffsets:
        """The exact correction of centring at m' instead of m, from the class counts (K,):
        the residuals of class c sum to -n_c delta_c, delta = m' - m, so e.g.
        sum (h - m_y)(h - m_y)^T = sum r r^T - sum_c n_c delta_c delta_c^T."""
        dn2 = torch.stack([(d.square().sum(1) * counts).sum() for d in self.deltas])  # (S,)
        # the d x d and K x K corrections are O(u^2) of the sums: float32 products suffice
        n32, d32 = counts.to(F32), self.deltas
        root_n = n32.sqrt()[:, None]  # sum_c n_c d_c d_c^T = (sqrt(n) D)^T (sqrt(n) D)
        dz = {i: d32[i] @ self.ht32[i].T for i in self.routes.gram}  # (K, K) delta Ht'^T
        zz = [(dz[i].T * n32) @ dz[i] for i in self.routes.gram]
        cross = None
        if self.geodesic:
            cross = -((self.deltas[0] * self.deltas[self._last]).sum(1) * counts).sum()
        return PassOffsets(
            rr=-dn2,
            zz=-torch.stack(zz).to(F64) if zz else counts.new_zeros(0, self.k, self.k),
            scatter={i: sym_gram((d32[i] * root_n).T).to(F64).neg_() for i in self.scatter},
            cross=cross,
        )
