"""Exact PFC / NC metrics from sufficient statistics (docs/metrics.md, paper eq. 7-9 / 17-19).

Every function here is pure, works on the device of its inputs, computes in float64 and never
builds a d x d matrix: all second-order quantities live in the K x K Gram algebra of
Htilde = [m_1 - g, ..., m_K - g] (docs/metrics.md "Notation").

Two kinds of helpers live here:

* the public metric functions (``pfc_metrics``, ``geodesic_curve``, ``relative_positions``, ...),
  which take whole feature matrices;
* the small streaming kernels they are built from (``class_moments``, ``second_moments``,
  ``cross_within``, ``geodesic_ncc_correct``, ``pfc_from_stats``, ``nc_from_stats``), which the
  streaming :class:`pfc_sweeps.tracker.CollapseTracker` reuses chunk by chunk, so the one-shot
  and the streaming numbers come from the same formulas. The tracker's float32 fast path
  (float32 row operations, float64 statistics) lives in :mod:`pfc_sweeps.kernels`
  (docs/precision.md); everything here computes in float64.

Numerics: pass 1 accumulates class sums (K, d) in float64; pass 2 centres each chunk at the
global mean g (u = h - g, float64) and needs one matmul u [Ht; ...]^T and one dot <u, u> per
layer: Tr Sigma_W uses ||h - m_y||^2 = ||u||^2 - 2 <u, Ht_y> + G_yy, whose rounding is
~ eps (1 + 1/PFC1) relative (float64 eps = 1.1e-16). NC1 = Tr(G^+ Z^T Z G^+) / N with
Z = Htilde^T (h - m_y) (K x K; no d x d matrix, pinv of the K x K Gram only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pfc_sweeps.schema import (
    NC1,
    NC2_EQUIANGLE,
    NC2_EQUINORM,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    TR_SB,
    TR_SW,
)

__all__ = [
    "DegenerateFeaturesError",
    "EmptyClassError",
    "MetricInputError",
    "centered",
    "class_moments",
    "cross_within",
    "effective_depth",
    "energy_ratio",
    "geodesic_bernstein_diag",
    "geodesic_curve",
    "geodesic_from_stats",
    "geodesic_ncc_correct",
    "geodesic_score_matrix",
    "layer_second_moments",
    "nc3",
    "nc4",
    "nc_from_stats",
    "ncc_correct_from_scores",
    "ncc_predict",
    "pfc_from_stats",
    "pfc_metrics",
    "relative_positions",
    "rows_per_chunk",
    "second_moments",
    "simplex_etf",
    "straightness",
    "thm1_inner",
    "transport_cost",
]

F64 = torch.float64
# Rows per chunk are chosen so that a work chunk holds at most this many elements:
# _CHUNK_ELEMENTS = 2**24 (128 MiB in float64) on accelerators; on CPU also at most
# _CPU_CHUNK_BYTES = 1 MiB (cache resident: elementwise ops are memory bound there).
_CHUNK_ELEMENTS = 2**24
_CPU_CHUNK_BYTES = 2**20
# per-row statistics (rows x layers x classes) are processed in blocks of this many elements
# on CPU (8 MiB in float64): per-op overhead is paid per block, not per chunk
_CPU_BLOCK_ELEMENTS = 2**20
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


def rows_per_chunk(d: int, device: torch.device | str | None = None, itemsize: int = 8) -> int:
    """Rows per work chunk: ``_CHUNK_ELEMENTS`` // d, on CPU at most
    ``_CPU_CHUNK_BYTES`` // (itemsize d) (L2-cache sized)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    budget = _CHUNK_ELEMENTS
    if dev.type == "cpu":
        budget = min(budget, _CPU_CHUNK_BYTES // itemsize)
    return max(1, budget // max(d, 1))


def block_elements(device: torch.device | str | None = None) -> int:
    """Element budget of one block of per-row statistics (rows x layers x classes, float64)
    that the streaming tracker's accumulators see at once: ``_CHUNK_ELEMENTS`` on
    accelerators, ``_CPU_BLOCK_ELEMENTS`` on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _CPU_BLOCK_ELEMENTS if dev.type == "cpu" else _CHUNK_ELEMENTS


def _chunks(n: int, d: int, device=None) -> list[slice]:
    step = rows_per_chunk(d, device)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def one_hot64(labels: Tensor, num_classes: int) -> Tensor:
    """(B,) labels -> (B, K) float64 indicator matrix (class sums become one matmul)."""
    out = torch.zeros(labels.shape[0], num_classes, dtype=F64, device=labels.device)
    out.scatter_(1, labels.view(-1, 1), 1.0)
    return out


def simplex_etf(num_classes: int, *, dtype=F64, device=None) -> Tensor:
    """E = (I_K - 1 1^T / K) / sqrt(K - 1), the unit-Frobenius-norm simplex ETF Gram (docs/metrics.md)."""
    k = num_classes
    eye = torch.eye(k, dtype=dtype, device=device)
    return (eye - 1.0 / k) / math.sqrt(k - 1)


# --------------------------------------------------------------------------------------------
# streaming kernels (pass 1: class sums; pass 2: everything that needs the final means)
# --------------------------------------------------------------------------------------------
def class_moments(counts: Tensor, sums: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class means, global mean, Htilde and its Gram from pass-1 sums.

    counts (K,) float64, sums (K, d) float64 -> means (K, d), g (d,) (mean of class means,
    docs/metrics.md), Ht (K, d) = rows m_k - g (the transpose of docs/metrics.md's Htilde), G (K, K) = Ht Ht^T.
    """
    means = sums / counts[:, None]  # (K, d)
    g = means.mean(dim=0)  # (d,)
    ht = means - g  # (K, d)
    gram = ht @ ht.T  # (K, K)
    return means, g, ht, gram


def ncc_scores(proj: Tensor, gram_diag: Tensor) -> Tensor:
    """||h - m_c||^2 - ||h - g||^2 = ||m_c - g||^2 - 2 <h - g, m_c - g>; proj = (h - g) Ht^T."""
    return gram_diag - 2.0 * proj  # (B, K)


def centered(x: Tensor, g: Tensor) -> Tensor:
    """u = x - g in float64 as a new tensor (cast, then subtract in place: one extra pass)."""
    if x.dtype == F64:
        return x - g
    return x.to(F64).sub_(g)


def second_moments(
    uu: Tensor, proj: Tensor, labels: Tensor, gram: Tensor, gram_diag: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Pass-2 statistics of one chunk for S layers at once (needs the final means).

    uu (S,) = sum_i ||u_i||^2 with u = h - g, proj (S, B, K) = u Ht^T (Ht = Htilde^T, rows
    m_c - g), labels (B,), gram (S, K, K) = Ht Ht^T, gram_diag (S, K).
    Returns sum_i ||h_i - m_{y_i}||^2 (S,), Z^T Z (S, K, K) with Z = (h - m_y)^T Htilde (the
    NC1 projection) and the NCC prediction (S, B) (ties -> lowest class index).
    ||h - m_y||^2 = ||u||^2 - 2 <u, Ht_y> + G_yy and Z = u Ht^T - G[y] are exact identities;
    they keep the per-layer work at one matmul and one dot (rounding ~ eps (1 + 1/PFC1)).
    """
    n_s, b, _ = proj.shape
    gy = gram.index_select(1, labels)  # (S, B, K) rows G[y_i] (G symmetric)
    col = labels.view(1, b, 1).expand(n_s, b, 1)
    trw = uu - 2.0 * proj.gather(2, col).sum((1, 2)) + gy.gather(2, col).sum((1, 2))
    z = proj - gy  # (S, B, K) = Htilde^T (h_i - m_{y_i})
    pred = ncc_scores(proj, gram_diag[:, None, :]).argmin(dim=2)  # (S, B)
    return trw, torch.bmm(z.transpose(1, 2), z), pred


def layer_second_moments(
    u: Tensor, labels: Tensor, rhs: Tensor, gram: Tensor, gram_diag: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`second_moments` for one layer: u (B, d) = h - g (float64), rhs (K + e, d) whose
    first K rows are Ht (extra rows get projected too, e.g. the other end's Ht).
    Returns proj_all = u rhs^T (B, K + e), the NCC prediction (B,), sum_i ||h_i - m_{y_i}||^2
    and Z^T Z (K, K)."""
    k = gram.shape[0]
    proj_all = u @ rhs.T  # (B, K + e)
    flat = u.reshape(-1)
    trw, zz, pred = second_moments(
        torch.dot(flat, flat)[None], proj_all[None, :, :k], labels, gram[None], gram_diag[None]
    )
    return proj_all, pred[0], trw[0], zz[0]


def cross_within(
    u0: Tensor, ul: Tensor, c01: Tensor, c10: Tensor, x01: Tensor, labels: Tensor
) -> Tensor:
    """sum_i <h0_i - m0_{y_i}, hL_i - mL_{y_i}> (the geodesic cross term B, times N).

    = <u0, uL> - <u0, HtL_y> - <uL, Ht0_y> + <Ht0_y, HtL_y> with c01 = u0 HtL^T,
    c10 = uL Ht0^T (B, K) and x01 = Ht0 HtL^T (K, K).
    """
    col = labels[:, None]
    return (
        torch.dot(u0.reshape(-1), ul.reshape(-1))
        - c01.gather(1, col).sum()
        - c10.gather(1, col).sum()
        + x01.diagonal().index_select(0, labels).sum()
    )


def geodesic_coefficients(ts: Tensor) -> Tensor:
    """(T,) -> (T, 3) with columns (1-t)^2, t(1-t), t^2."""
    ts = ts.to(F64)
    return torch.stack([(1 - ts) ** 2, ts * (1 - ts), ts**2], dim=1)


def geodesic_gram(coef: Tensor, g0: Tensor, x01: Tensor, gl: Tensor) -> Tensor:
    """G(t) = (1-t)^2 G0 + t(1-t) (X + X^T) + t^2 GL with X = Ht0 HtL^T; (T, K, K)."""
    return (
        coef[:, 0, None, None] * g0
        + coef[:, 1, None, None] * (x01 + x01.T)
        + coef[:, 2, None, None] * gl
    )


def geodesic_score_matrix(coef: Tensor, gdiag_t: Tensor) -> Tensor:
    """(K, T, 4) right factor of the geodesic NCC scores: [-2 coef (T, 3), diag G(t)_c]."""
    t_count, k = gdiag_t.shape
    return torch.cat([(-2.0 * coef).expand(k, t_count, 3), gdiag_t.T[:, :, None]], dim=2)


def ncc_correct_from_scores(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Count of argmin_c scores[c, t, i] == labels[i] (ties -> lowest c), per t.

    scores (K, T, B) -> (T,) int64; ``scores`` is overwritten (scratch); mask (B,) bool: count
    only these samples. Same decision as
    argmin, exactly: y is the lowest-index argmin iff s_y < s_c for all c != y, except that
    s_y == s_c is allowed for c > y. One reduction over the leading K axis (much faster than
    argmin over a short inner axis on CPU); exact ties take a slower path.
    """
    k, t_count, b = scores.shape
    idx = labels.view(1, 1, b).expand(1, t_count, b)
    s_y = scores.gather(0, idx)[0]  # (T, B)
    others = scores.scatter_(0, idx, math.inf).amin(dim=0)  # (T, B) min over c != y
    ok = s_y < others
    tie = s_y == others
    # rare exact ties: y is correct iff every tying class has a higher index (branch-free on
    # accelerators, where a data-dependent branch would cost a host sync per chunk)
    if scores.device.type != "cpu" or bool(tie.any()):
        before = torch.arange(k, device=labels.device)[:, None, None] < labels.view(1, 1, b)
        tied_before = ((scores == s_y[None]) & before).any(dim=0)  # y's slot holds inf
        ok |= tie & ~tied_before
    if mask is not None:
        ok &= mask
    return ok.sum(dim=1)


def geodesic_bernstein_diag(gram0: Tensor, x01: Tensor, graml: Tensor) -> Tensor:
    """(3, K) = [diag G0, 2 diag X, diag GL]: ||m_c(t) - g(t)||^2 in the basis
    (1-t)^2, t(1-t), t^2 (X = Ht0 HtL^T)."""
    return torch.stack([torch.diagonal(gram0), 2.0 * torch.diagonal(x01), torch.diagonal(graml)])


# decided-sample margins for the geodesic NCC: relative to each sample's score scale, far above
# float64 rounding (~1e-15), so every decision agrees with the direct evaluation at any t
_GEO_REL_MARGIN = 1e-9
_GEO_DISC_SLACK = 1e-3


def _geodesic_decided(bern: Tensor, lhs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Samples whose NCC decision is the same at every t in [0, 1]: (always_right, always_wrong).

    s_c(t) = (1-t)^2 A_c + t(1-t) B_c + t^2 C_c; for c != y, q = s_c - s_y has coefficients
    (a, b, c) and q = (sqrt(a) (1-t) - sqrt(c) t)^2 + (b + 2 sqrt(ac)) t(1-t), so a, c > 0 and
    b > -2 sqrt(ac) make q > 0 on [0, 1] (class c never wins); the mirror makes q < 0 on [0, 1]
    (c always beats y). Margins keep these decisions far from rounding and from ties.
    lhs (K, 3, b) holds p0, cross, pl class-major (the class axis first: fast reductions).
    """
    coef = torch.addcmul(bern.T[:, :, None], lhs, lhs.new_tensor(-2.0))  # (K, 3, b) A, B, C
    col = labels.view(1, 1, -1)
    own = coef.gather(0, col.expand(1, 3, -1))  # (1, 3, b)
    scale = coef.abs().amax(dim=(0, 1))  # (b,)
    qa, qb, qc = (coef - own).unbind(1)  # (K, b) each; zero in row y
    m = _GEO_REL_MARGIN * scale
    root = (qa * qc).clamp_min_(0).sqrt_().mul_(2.0 * (1.0 - _GEO_DISC_SLACK))
    pos = (qa > m) & (qc > m) & (qb > -root)
    neg = (qa < -m) & (qc < -m) & (qb < root)
    row_y = labels.view(1, -1)
    return pos.scatter_(0, row_y, True).all(dim=0), neg.scatter_(0, row_y, False).any(dim=0)


def geodesic_ncc_correct(
    score_matrix: Tensor,
    bern: Tensor,
    p0: Tensor,
    cross: Tensor,
    pl: Tensor,
    labels: Tensor,
    budget: int = _GEO_SCORE_ELEMENTS,
) -> Tensor:
    """Number of correct NCC predictions of h(t) = (1-t) h0 + t hL for every t, one chunk.

    With u = h0 - g0, v = hL - gL: <h(t) - g(t), m_c(t) - g(t)> =
    (1-t)^2 <u, Ht0_c> + t(1-t) (<u, HtL_c> + <v, Ht0_c>) + t^2 <v, HtL_c>, so
    p0 = u Ht0^T, cross = u HtL^T + v Ht0^T, pl = v HtL^T (each (B, K); transposed views of
    class-major (K, B) tensors are fastest) give the scores ||m_c(t) - g(t)||^2 - 2 <...>
    exactly (docs/metrics.md "Geodesic-curve prediction").
    score_matrix (K, T, 4) from :func:`geodesic_score_matrix`, bern (3, K) from
    :func:`geodesic_bernstein_diag`. Samples whose decision provably does not depend on t
    (:func:`_geodesic_decided`) are counted directly; the rest are evaluated at every t.
    Returns (T,) int64 counts.
    """
    k, t_count, _ = score_matrix.shape
    b = labels.shape[0]
    lhs = torch.empty(k, 4, b, dtype=p0.dtype, device=p0.device)  # (K, 4, B) class-major
    for j, x in enumerate((p0, cross, pl)):
        lhs[:, j].copy_(x.T)
    right, wrong = _geodesic_decided(bern, lhs[:, :3], labels)
    lhs[:, 3] = 1.0
    out = right.sum().expand(t_count).clone()  # (T,) int64
    undecided = ~(right | wrong)
    if labels.device.type == "cpu":  # data-dependent shapes are cheap here
        rest = undecided.nonzero().flatten()
        if rest.numel() < b:
            lhs, labels, b = lhs.index_select(2, rest), labels.index_select(0, rest), rest.numel()
        undecided = None
    rows = max(1, budget // max(t_count * k, 1))
    for s in range(0, b, rows):
        e = min(s + rows, b)
        scores = torch.bmm(score_matrix, lhs[:, :, s:e])  # (K, T, b): (K, T, 4) @ (K, 4, b)
        mask = undecided[s:e] if undecided is not None else None  # accelerators: mask rows
        out += ncc_correct_from_scores(scores, labels[s:e], mask)
    return out


def pfc_from_stats(n: int, trw_sum: Tensor, gram: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """PFC1-3 (docs/metrics.md; paper eq. 7-9), batched over a leading axis.

    n samples, trw_sum (T,) = sum_i ||h_i - m_{y_i}||^2, gram (T, K, K), correct (T,).
    Returns tensors (T,) keyed by the schema names PFC1, PFC2, PFC3, TR_SW, TR_SB.
    Raises DegenerateFeaturesError where Tr Sigma_B = 0 (all class means equal).
    """
    k = gram.shape[-1]
    tr_sw = trw_sum.to(F64).clamp_min(0.0) / n  # >= 0; rounding may give -1e-16
    tr_sb = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / k
    if bool((tr_sb <= 0).any()):
        raise DegenerateFeaturesError(
            "Tr(Sigma_B) = 0: all class means coincide, PFC1 and PFC2 are undefined"
        )
    gnorm = torch.linalg.matrix_norm(gram)  # (T,) Frobenius
    etf = simplex_etf(k, device=gram.device)
    pfc2 = torch.linalg.matrix_norm(gram / gnorm[:, None, None] - etf)
    return {
        PFC1: tr_sw / tr_sb,
        PFC2: pfc2,
        PFC3: correct.to(F64) / n,
        TR_SW: tr_sw,
        TR_SB: tr_sb,
    }


def nc_from_stats(n: int, gram: Tensor, zz: Tensor) -> dict[str, Tensor]:
    """NC1 and NC2 from the K x K statistics of one layer (docs/metrics.md "Classic NC metrics").

    NC1 = Tr(Sigma_W Sigma_B^+)/K. With Sigma_B = Htilde Htilde^T / K, G = Htilde^T Htilde and
    Z_i = Htilde^T (h_i - m_{y_i}): (Htilde Htilde^T)^+ = Htilde G^{+2} Htilde^T, hence
    NC1 = Tr(G^+ (Z^T Z / N) G^+) -- exact, no d x d matrix. zz = Z^T Z (K, K).
    NC2 equinorm uses the unbiased std over classes (as Papyan et al.'s code: torch.std).
    """
    k = gram.shape[0]
    # G^+ = V diag(1/lam) V^T over the eigenvalues kept by pinv's default cutoff, so
    # Tr(G^+ zz G^+) = sum_j lam_j^-2 (V^T zz V)_jj: one eigh and one K x K x K product
    lam, vec = torch.linalg.eigh(gram)  # (K,), (K, K)
    keep = lam.abs() > torch.finfo(lam.dtype).eps * k * lam.abs().max()
    inv2 = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0).square(), 0.0)
    nc1 = (inv2 * ((zz / n) @ vec * vec).sum(0)).sum()
    norms = torch.diagonal(gram).clamp_min(0).sqrt()  # (K,) ||m_k - g||
    if bool((norms == 0).any()):
        bad = (norms == 0).nonzero().flatten().tolist()
        raise DegenerateFeaturesError(
            f"class mean(s) {bad} equal the global mean: NC2 cosines are undefined"
        )
    equinorm = norms.std() / norms.mean()
    cos = gram / (norms[:, None] * norms[None, :])
    off = ~torch.eye(k, dtype=torch.bool, device=gram.device)
    equiangle = (cos[off] + 1.0 / (k - 1)).abs().mean()
    return {NC1: nc1, NC2_EQUINORM: equinorm, NC2_EQUIANGLE: equiangle}


def geodesic_from_stats(
    ts: Tensor,
    n: int,
    trw0: Tensor,
    trw_cross: Tensor,
    trwl: Tensor,
    g0: Tensor,
    x01: Tensor,
    gl: Tensor,
    correct: Tensor,
) -> dict[str, Tensor]:
    """Geodesic PFC curves from sufficient statistics (docs/metrics.md "Geodesic-curve prediction").

    trw0 = A*N, trw_cross = B*N, trwl = C*N (sums over samples); Tr Sigma_W(t) =
    (1-t)^2 A + 2t(1-t) B + t^2 C; G(t) from G0, X = Ht0 HtL^T, GL; correct (T,) NCC counts.
    """
    coef = geodesic_coefficients(ts.to(g0.device))  # (T, 3)
    trw = coef[:, 0] * trw0 + 2.0 * coef[:, 1] * trw_cross + coef[:, 2] * trwl  # (T,)
    k = g0.shape[0]
    step = max(1, _GEO_SCORE_ELEMENTS // (k * k))  # G(t) for a block of t at a time
    parts = []
    for s in range(0, coef.shape[0], step):
        gram_t = geodesic_gram(coef[s : s + step], g0, x01, gl)  # (T_block, K, K)
        try:
            out = pfc_from_stats(n, trw[s : s + step], gram_t, correct[s : s + step])
        except DegenerateFeaturesError as err:
            raise DegenerateFeaturesError(f"on the geodesic curve: {err}") from None
        parts.append(out)
    return {key: torch.cat([p[key] for p in parts]) for key in PFC_METRICS}


# --------------------------------------------------------------------------------------------
# one-shot public functions
# --------------------------------------------------------------------------------------------
def _layer_pass1(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    counts = torch.bincount(labels, minlength=num_classes).to(F64)  # (K,)
    sums = torch.zeros(num_classes, x.shape[1], dtype=F64, device=x.device)
    for sl in _chunks(x.shape[0], x.shape[1], x.device):
        sums.addmm_(one_hot64(labels[sl], num_classes).T, x[sl].to(F64))
    check_counts(counts)
    return counts, sums


def _layer_stats(x: Tensor, labels: Tensor, num_classes: int) -> dict:
    counts, sums = _layer_pass1(x, labels, num_classes)
    means, g, ht, gram = class_moments(counts, sums)
    gdiag = torch.diagonal(gram)
    trw = torch.zeros((), dtype=F64, device=x.device)
    zz = torch.zeros(num_classes, num_classes, dtype=F64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for sl in _chunks(x.shape[0], x.shape[1], x.device):
        y = labels[sl]
        _, pred, trw_b, zz_b = layer_second_moments(centered(x[sl], g), y, ht, gram, gdiag)
        trw += trw_b
        zz += zz_b
        correct += (pred == y).sum()
    return {
        "means": means,
        "g": g,
        "ht": ht,
        "gram": gram,
        "trw": trw,
        "zz": zz,
        "correct": correct,
    }


def pfc_metrics(features: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """PFC1-3 and NC1/NC2 of one layer (docs/metrics.md; paper eq. 7-9).

    features (N, d) any float dtype/device, labels (N,) ints in [0, K). Exact, float64, streamed
    over row chunks, no d x d matrix. Keys: schema PFC1-3, NC1, NC2_EQUINORM, NC2_EQUIANGLE.
    Raises MetricInputError (bad shapes, labels out of range, NaN/inf), EmptyClassError,
    DegenerateFeaturesError (all class means equal).
    """
    labels = _check_inputs(features, labels, num_classes)
    n = features.shape[0]
    st = _layer_stats(features, labels, num_classes)
    pfc = pfc_from_stats(n, st["trw"][None], st["gram"][None], st["correct"][None])
    nc = nc_from_stats(n, st["gram"], st["zz"])
    out = {key: float(pfc[key][0]) for key in PFC_METRICS}
    out.update({key: float(v) for key, v in nc.items()})
    return out


def ncc_predict(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Nearest-class-center prediction (N,) with the class means of (features, labels)."""
    labels = _check_inputs(features, labels, num_classes)
    counts, sums = _layer_pass1(features, labels, num_classes)
    _, g, ht, gram = class_moments(counts, sums)
    gdiag = torch.diagonal(gram)
    preds = []
    for sl in _chunks(features.shape[0], features.shape[1], features.device):
        proj = centered(features[sl], g) @ ht.T
        preds.append(ncc_scores(proj, gdiag).argmin(dim=1))
    return torch.cat(preds)


def _as_ts(ts: Tensor | Sequence[float]) -> Tensor:
    ts = torch.as_tensor(ts, dtype=F64)
    if ts.dim() != 1 or ts.numel() == 0:
        raise MetricInputError(f"ts must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()):
        raise MetricInputError(f"ts must be finite, got {ts.tolist()}")
    return ts


def _check_pair(h0: Tensor, hl: Tensor) -> None:
    check_features(h0, "h0")
    check_features(hl, "hL")
    if h0.shape != hl.shape:
        raise MetricInputError(
            f"h0 and hL must have the same shape (N, d), got {tuple(h0.shape)} and "
            f"{tuple(hl.shape)}"
        )


def geodesic_curve(
    h0: Tensor,
    hl: Tensor,
    labels: Tensor,
    num_classes: int,
    ts: Tensor | Sequence[float],
) -> dict[str, Tensor]:
    """PFC1-3 of h(t) = (1-t) h0 + t hL at each t (docs/metrics.md "Geodesic-curve prediction", Fig. 3).

    Exact quadratics in sufficient statistics; the interpolated features are never built.
    h0, hL (N, d), labels (N,), ts (T,) (any real t; [0, 1] is the geodesic).
    Returns float64 CPU tensors (T,) keyed by schema.PFC_METRICS.
    """
    check_num_classes(num_classes)
    _check_pair(h0, hl)
    labels = check_labels(labels, h0.shape[0], num_classes).to(h0.device)
    ts = _as_ts(ts)
    n, d = h0.shape
    k = num_classes
    dev = h0.device
    c0, s0 = _layer_pass1(h0, labels, k)
    cl, sl_ = _layer_pass1(hl, labels, k)
    _, g0, ht0, gram0 = class_moments(c0, s0)
    _, gl, htl, graml = class_moments(cl, sl_)
    x01 = ht0 @ htl.T  # (K, K)
    coef = geodesic_coefficients(ts).to(dev)  # (T, 3)
    gdiag_t = torch.diagonal(geodesic_gram(coef, gram0, x01, graml), dim1=1, dim2=2)  # (T, K)
    smat = geodesic_score_matrix(coef, gdiag_t)  # (K, T, 4)
    bern = geodesic_bernstein_diag(gram0, x01, graml)  # (3, K)
    rhs0 = torch.cat([ht0, htl])  # (2K, d)
    rhsl = torch.cat([htl, ht0])  # (2K, d)
    gd0, gdl = torch.diagonal(gram0), torch.diagonal(graml)
    trw = torch.zeros(3, dtype=F64, device=dev)
    correct = torch.zeros(ts.numel(), dtype=torch.int64, device=dev)
    for sl in _chunks(n, 2 * d, dev):
        y = labels[sl]
        u = centered(h0[sl], g0)  # (B, d)
        v = centered(hl[sl], gl)  # (B, d)
        proj0, _, trw0, _ = layer_second_moments(u, y, rhs0, gram0, gd0)
        projl, _, trwl, _ = layer_second_moments(v, y, rhsl, graml, gdl)
        p0, c01 = proj0[:, :k], proj0[:, k:]
        pl, c10 = projl[:, :k], projl[:, k:]
        trw += torch.stack([trw0, cross_within(u, v, c01, c10, x01, y), trwl])
        correct += geodesic_ncc_correct(smat, bern, p0, c01 + c10, pl, y)
    out = geodesic_from_stats(ts, n, trw[0], trw[1], trw[2], gram0, x01, graml, correct)
    return {key: v.cpu() for key, v in out.items()}


def _check_layers(features_per_layer: Sequence[Tensor]) -> list[Tensor]:
    layers = list(features_per_layer)
    if len(layers) < 2:
        raise MetricInputError(f"need at least 2 layers (L >= 1), got {len(layers)}")
    for i, h in enumerate(layers):
        check_features(h, f"features of layer {i}")
        if h.shape != layers[0].shape:
            raise MetricInputError(
                f"all layers must have the same shape (N, d) for path lengths; layer 0 has "
                f"{tuple(layers[0].shape)}, layer {i} has {tuple(h.shape)}"
            )
    return layers


def _path_stats(layers: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-step sums of ||h^{l+1} - h^l|| and its square (L,), and of ||h^L - h^0|| (and ^2)."""
    steps = len(layers) - 1
    dev = layers[0].device
    plen = torch.zeros(steps, dtype=F64, device=dev)
    psq = torch.zeros(steps, dtype=F64, device=dev)
    disp = torch.zeros(2, dtype=F64, device=dev)
    n, d = layers[0].shape
    for sl in _chunks(n, d, dev):
        for j in range(steps):
            sq = ((layers[j + 1][sl].to(F64) - layers[j][sl].to(F64)) ** 2).sum(dim=1)
            plen[j] += sq.sqrt().sum()
            psq[j] += sq.sum()
        sq = ((layers[-1][sl].to(F64) - layers[0][sl].to(F64)) ** 2).sum(dim=1)
        disp += torch.stack([sq.sqrt().sum(), sq.sum()])
    return plen, psq, disp[0], disp[1]


def relative_positions_from_lengths(step_lengths: Tensor) -> Tensor:
    """r_l = sum_{j<l} len_j / sum_j len_j, (L,) -> (L+1,) float64 (docs/metrics.md "Depth coordinate")."""
    total = step_lengths.sum()
    if not bool(total > 0):
        raise DegenerateFeaturesError(
            "the forward path has length 0 (all layers equal): relative positions are undefined"
        )
    cum = torch.cat([step_lengths.new_zeros(1), torch.cumsum(step_lengths, 0)])
    r = cum / total
    r[-1] = 1.0
    return r


def relative_positions(features_per_layer: Sequence[Tensor]) -> Tensor:
    """Relative depth r_l of layers 0..L from path lengths (paper section IV-A, docs/metrics.md).

    r_l = sum_{j<l} sum_i ||h_i^{j+1} - h_i^j|| / sum_{j<L} sum_i ||h_i^{j+1} - h_i^j||,
    so r_0 = 0 and r_L = 1. Needs no labels and no means. Returns a float64 CPU tensor (L+1,).
    """
    layers = _check_layers(features_per_layer)
    plen, _, _, _ = _path_stats(layers)
    return relative_positions_from_lengths(plen).cpu()


def straightness(features_per_layer: Sequence[Tensor]) -> float:
    """sum_i ||h_i^L - h_i^0|| / sum_i sum_l ||h_i^{l+1} - h_i^l|| in (0, 1] (docs/metrics.md)."""
    layers = _check_layers(features_per_layer)
    plen, _, disp, _ = _path_stats(layers)
    total = plen.sum()
    if not bool(total > 0):
        raise DegenerateFeaturesError("the forward path has length 0: straightness is undefined")
    return float(disp / total)


def energy_ratio(features_per_layer: Sequence[Tensor]) -> float:
    """L sum_l sum_i ||h_i^{l+1} - h_i^l||^2 / sum_i ||h_i^L - h_i^0||^2 >= 1 (docs/metrics.md)."""
    layers = _check_layers(features_per_layer)
    _, psq, _, disp_sq = _path_stats(layers)
    if not bool(disp_sq > 0):
        raise DegenerateFeaturesError("h^L == h^0 for every sample: energy_ratio is undefined")
    return float((len(layers) - 1) * psq.sum() / disp_sq)


def _htilde_pair(h0: Tensor, hl: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    check_num_classes(num_classes)
    _check_pair(h0, hl)
    labels = check_labels(labels, h0.shape[0], num_classes).to(h0.device)
    c0, s0 = _layer_pass1(h0, labels, num_classes)
    cl, sl = _layer_pass1(hl, labels, num_classes)
    return class_moments(c0, s0)[2], class_moments(cl, sl)[2]


def thm1_inner(h0: Tensor, hl: Tensor, labels: Tensor, num_classes: int) -> float:
    """Theorem 1's assumption: sum_k <Htilde^0_k, Htilde^L_k> = trace(Htilde^0^T Htilde^L)."""
    ht0, htl = _htilde_pair(h0, hl, labels, num_classes)
    return float((ht0 * htl).sum())


def transport_cost(h0: Tensor, hl: Tensor, labels: Tensor, num_classes: int) -> float:
    """Theorem 2's transport cost ||Htilde^L - Htilde^0||_F^2."""
    ht0, htl = _htilde_pair(h0, hl, labels, num_classes)
    return float(((htl - ht0) ** 2).sum())


def _check_classifier(weight: Tensor, d: int, num_classes: int, bias: Tensor | None = None):
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (num_classes, d):
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise MetricInputError(
            f"classifier weight must have shape ({num_classes}, {d}), got {shape}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise MetricInputError("classifier weight contains NaN or inf")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (num_classes,):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise MetricInputError(f"classifier bias must have shape ({num_classes},), got {shape}")
        if not bool(torch.isfinite(bias).all()):
            raise MetricInputError("classifier bias contains NaN or inf")


def nc3_from_stats(weight: Tensor, ht: Tensor) -> Tensor:
    """|| W^T/||W||_F - Htilde/||Htilde||_F ||_F^2 with weight (K, d), ht (K, d) = Htilde^T."""
    w = weight.to(device=ht.device, dtype=F64)
    return ((w / torch.linalg.norm(w) - ht / torch.linalg.norm(ht)) ** 2).sum()


def nc3(classifier_weight: Tensor, features: Tensor, labels: Tensor, num_classes: int) -> float:
    """NC3 self-duality of the last layer (docs/metrics.md): ||W^T/||W||_F - Htilde/||Htilde||_F||_F^2."""
    labels = _check_inputs(features, labels, num_classes)
    _check_classifier(classifier_weight, features.shape[1], num_classes)
    counts, sums = _layer_pass1(features, labels, num_classes)
    ht = class_moments(counts, sums)[2]
    if not bool(torch.linalg.norm(ht) > 0):
        raise DegenerateFeaturesError("Htilde = 0 (all class means equal): NC3 is undefined")
    if not bool(torch.linalg.norm(classifier_weight.to(F64)) > 0):
        raise MetricInputError("classifier weight is all zeros: NC3 is undefined")
    return float(nc3_from_stats(classifier_weight, ht))


def nc4(
    classifier_weight: Tensor,
    classifier_bias: Tensor | None,
    features: Tensor,
    labels: Tensor,
    num_classes: int,
) -> float:
    """NC4: fraction of samples where argmax_c (W h + b)_c differs from the NCC argmin (docs/metrics.md).

    A missing bias (None) counts as zero. Ties go to the lowest class index in both.
    """
    labels = _check_inputs(features, labels, num_classes)
    _check_classifier(classifier_weight, features.shape[1], num_classes, classifier_bias)
    ncc = ncc_predict(features, labels, num_classes)
    w = classifier_weight.to(device=features.device, dtype=F64)
    b = (
        torch.zeros(num_classes, dtype=F64, device=features.device)
        if classifier_bias is None
        else classifier_bias.to(device=features.device, dtype=F64)
    )
    disagree = 0
    for sl in _chunks(features.shape[0], features.shape[1], features.device):
        logits = torch.addmm(b, features[sl].to(F64), w.T)
        disagree += int((logits.argmax(dim=1) != ncc[sl]).sum())
    return disagree / features.shape[0]


def effective_depth(ncc_errors: Sequence[float] | Tensor, epsilon: float = 0.01) -> int:
    """Smallest layer index l with NCC error (1 - PFC3) <= epsilon (docs/metrics.md).

    Returns -1 when no layer reaches epsilon (the sentinel is never a valid layer index;
    aggregations must treat it as "not reached within L layers").
    """
    errs = torch.as_tensor(ncc_errors, dtype=F64).flatten()
    if errs.numel() == 0:
        raise MetricInputError("ncc_errors is empty; need one value per layer")
    if not bool(torch.isfinite(errs).all()):
        raise MetricInputError(f"ncc_errors must be finite, got {errs.tolist()}")
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
        raise MetricInputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    hit = (errs <= epsilon).nonzero().flatten()
    return int(hit[0]) if hit.numel() else -1
