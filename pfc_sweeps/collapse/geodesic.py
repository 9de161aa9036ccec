"""The geodesic prediction from the statistics of the first and last layers (paper eq. 17-19,
docs/metrics.md "Geodesic"): PFC1-3 along h(t) = (1-t) h0 + t hL without building h(t).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pfc_sweeps.collapse.inputs import (
    _GEO_SCORE_ELEMENTS,
    F64,
    DegenerateFeaturesError,
)
from pfc_sweeps.collapse.stats import FROBENIUS_MIN_K, ncc_correct_from_scores, pfc_from_stats
from pfc_sweeps.results.schema import (
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    TR_SB,
    TR_SW,
)


def geodesic_coefficients(ts: Tensor) -> Tensor:
    """Bernstein coefficients of the geodesic h(t) = (1-t) h0 + t hL (paper eq. 17).

    Args:
        ts: (T,) points t in [0, 1].

    Returns:
        (T, 3) float64 columns (1-t)^2, t(1-t), t^2: every second moment along the path is
        a combination of the three.
    """
    ts = ts.to(F64)
    return torch.stack([(1 - ts) ** 2, ts * (1 - ts), ts**2], dim=1)


def geodesic_gram(coef: Tensor, g0: Tensor, x01: Tensor, gl: Tensor) -> Tensor:
    """Gram of the centred class means along the geodesic (PFC2(t), paper eq. 17-19).

    G(t) = (1-t)^2 G0 + t(1-t) (X + X^T) + t^2 GL with X = Ht0 HtL^T.

    Args:
        coef: (T, 3) from :func:`geodesic_coefficients`.
        g0, gl: (K, K) Grams of layers 0 and L.
        x01: (K, K) Ht0 HtL^T.

    Returns:
        (T, K, K) float64 G(t).
    """
    k = g0.shape[0]
    mats = torch.stack([g0, x01 + x01.T, gl]).view(3, k * k)
    return (coef.to(mats.dtype) @ mats).view(-1, k, k)  # one GEMM, not 3 broadcast passes


def geodesic_score_matrix(coef: Tensor, gdiag_t: Tensor) -> Tensor:
    """Right factor of the geodesic NCC scores (PFC3(t), paper eq. 17-19).

    A sample's scores at every t are its (K, 4) left factor [p0, cross, pL, 1] times this.

    Args:
        coef: (T, 3) from :func:`geodesic_coefficients`.
        gdiag_t: (T, K) ||m_c(t) - g(t)||^2.

    Returns:
        (K, T, 4) float64 [-2 coef, diag G(t)_c], class-major.
    """
    t_count, k = gdiag_t.shape
    return torch.cat([(-2.0 * coef).expand(k, t_count, 3), gdiag_t.T[:, :, None]], dim=2)


def geodesic_bernstein_diag(gram0: Tensor, x01: Tensor, graml: Tensor) -> Tensor:
    """||m_c(t) - g(t)||^2 in the Bernstein basis (1-t)^2, t(1-t), t^2 (paper eq. 17).

    Args:
        gram0, graml: (K, K) Grams of layers 0 and L.
        x01: (K, K) X = Ht0 HtL^T.

    Returns:
        (3, K) float64 [diag G0, 2 diag X, diag GL].
    """
    return torch.stack([torch.diagonal(gram0), 2.0 * torch.diagonal(x01), torch.diagonal(graml)])


# decided-sample margins for the geodesic NCC, by the dtype the test runs in: relative to each
# sample's score scale, far above its rounding (float64 ~1e-15, float32 ~1e-7), so every
# decision agrees with the direct float64 evaluation at any t
_GEO_MARGINS = {torch.float64: (1e-9, 1e-3), torch.float32: (1e-4, 1e-2)}  # (rel, disc slack)


def _geodesic_decided(bern: Tensor, lhs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Samples whose NCC decision is the same at every t in [0, 1]: (always_right, always_wrong).

    s_c(t) = (1-t)^2 A_c + t(1-t) B_c + t^2 C_c; for c != y, q = s_c - s_y has coefficients
    (a, b, c) and q = (sqrt(a) (1-t) - sqrt(c) t)^2 + (b + 2 sqrt(ac)) t(1-t), so a, c > 0 and
    b > -2 sqrt(ac) make q > 0 on [0, 1] (class c never wins); the mirror makes q < 0 on [0, 1]
    (c always beats y). Margins keep these decisions far from rounding and from ties.
    lhs (K, 3, b) holds p0, cross, pl class-major (the class axis first: fast reductions).
    """
    rel, slack = _GEO_MARGINS[lhs.dtype]
    coef = torch.addcmul(bern.T[:, :, None].to(lhs.dtype), lhs, lhs.new_tensor(-2.0))  # (K,3,b)
    col = labels.view(1, 1, -1)
    own = coef.gather(0, col.expand(1, 3, -1))  # (1, 3, b)
    scale = coef.abs().amax(dim=(0, 1))  # (b,)
    qa, qb, qc = (coef - own).unbind(1)  # (K, b) each; zero in row y
    m = rel * scale
    root = (qa * qc).clamp_min_(0).sqrt_().mul_(2.0 * (1.0 - slack))
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
    lhs = lhs.to(score_matrix.dtype)  # the direct evaluation in float64
    rows = max(1, budget // max(t_count * k, 1))
    for s in range(0, b, rows):
        e = min(s + rows, b)
        scores = torch.bmm(score_matrix, lhs[:, :, s:e])  # (K, T, b): (K, T, 4) @ (K, 4, b)
        mask = undecided[s:e] if undecided is not None else None  # accelerators: mask rows
        out += ncc_correct_from_scores(scores, labels[s:e], mask)
    return out


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
    """Geodesic PFC curves from sufficient statistics.

    Paper Fig. 3, eq. 17-19; docs/metrics.md "Geodesic-curve prediction".
    Tr Sigma_W(t) = (1-t)^2 A + 2t(1-t) B + t^2 C; G(t) = (1-t)^2 G0 + t(1-t)(X + X^T) + t^2 GL.

    Args:
        ts: (T,) values of t; n: number of samples.
        trw0, trw_cross, trwl: A N, B N, C N (sums over samples, 0-d).
        g0, x01, gl: (K, K) G0, X = Ht0 HtL^T, GL.
        correct: (T,) NCC hit counts along the curve.

    Returns:
        (T,) tensors keyed by PFC1, PFC2, PFC3, TR_SW, TR_SB.

    Raises:
        DegenerateFeaturesError: Tr Sigma_B(t) = 0 at some t.
    """
    coef = geodesic_coefficients(ts.to(g0.device))  # (T, 3)
    trw = coef[:, 0] * trw0 + 2.0 * coef[:, 1] * trw_cross + coef[:, 2] * trwl  # (T,)
    k = g0.shape[0]
    if k >= FROBENIUS_MIN_K:
        return _geodesic_from_frobenius(n, coef, trw, g0, x01, gl, correct)
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


def _geodesic_from_frobenius(
    n: int, coef: Tensor, trw: Tensor, g0: Tensor, x01: Tensor, gl: Tensor, correct: Tensor
) -> dict[str, Tensor]:
    """PFC1-3 along the curve without forming G(t) (docs/metrics.md "Geodesic-curve
    prediction"): G(t) = sum_i c_i(t) A_i with A = (G0, X + X^T, GL), so
    ||G(t)||_F^2 = c^T M c with M_ij = <A_i, A_j>_F, Tr G(t) = c . (Tr A_i), 1^T G(t) 1 likewise,
    and with the unit-norm ETF E: ||G/||G|| - E||_F^2 = 2 - 2 <G, E> / ||G||,
    <G, E> = (Tr G - 1^T G 1 / K) / sqrt(K - 1). Rounding ~ eps / PFC2^2 relative (PFC2 > 1e-4
    keeps it below 1e-8).

    Args:
        n: number of samples; coef (T, 3) from :func:`geodesic_coefficients`; trw (T,) sums of
            ||h(t) - m_y(t)||^2; g0, x01, gl (K, K); correct (T,) NCC counts.

    Returns:
        (T,) tensors keyed by PFC1, PFC2, PFC3, TR_SW, TR_SB.

    Raises:
        DegenerateFeaturesError: Tr Sigma_B(t) = 0 at some t.
    """
    k = g0.shape[0]
    mats = (g0, x01 + x01.T, gl)
    flat = [a.reshape(-1) for a in mats]  # (K^2,) views: dot products make no K x K temporary
    gram_m = torch.stack([torch.stack([torch.dot(a, b) for b in flat]) for a in flat])  # (3, 3)
    traces = torch.stack([torch.diagonal(a).sum() for a in mats])  # (3,)
    totals = torch.stack([a.sum() for a in mats])  # (3,) 1^T A 1
    tr_g = coef @ traces  # (T,)
    gnorm = ((coef @ gram_m) * coef).sum(1).clamp_min(0).sqrt()  # (T,)
    if bool((tr_g <= 0).any()):
        raise DegenerateFeaturesError(
            "on the geodesic curve: Tr(Sigma_B) = 0: all class means coincide, PFC1 and PFC2 "
            "are undefined"
        )
    inner = (tr_g - (coef @ totals) / k) / math.sqrt(k - 1)
    tr_sw, tr_sb = trw.clamp_min(0.0) / n, tr_g / k
    return {
        PFC1: tr_sw / tr_sb,
        PFC2: (2.0 - 2.0 * inner / gnorm).clamp_min(0).sqrt(),
        PFC3: correct.to(F64) / n,
        TR_SW: tr_sw,
        TR_SB: tr_sb,
    }
