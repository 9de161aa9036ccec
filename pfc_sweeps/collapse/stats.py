"""The sufficient-statistics algebra of the metrics: class moments, K x K Grams, NCC and geodesic scores, and the metrics from them (docs/metrics.md, paper eq. 7-9 / 17-19).

Every function is pure, works on the device of its inputs and computes in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pfc_sweeps.collapse.inputs import (
    _GEO_SCORE_ELEMENTS,
    F64,
    DegenerateFeaturesError,
    simplex_etf,
)
from pfc_sweeps.results.schema import (
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


# --------------------------------------------------------------------------------------------
# streaming kernels (pass 1: class sums; pass 2: everything that needs the final means)
# --------------------------------------------------------------------------------------------
def class_moments(counts: Tensor, sums: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class means, global mean, Htilde and its Gram from pass-1 sums.

    Paper section III (notation); docs/metrics.md "Notation".

    Args:
        counts: (K,) float64 class counts (all > 0).
        sums: (K, d) float64 class sums.

    Returns:
        means (K, d); g (d,) the mean of the class means; Ht (K, d) rows m_k - g (the
        transpose of docs/metrics.md's Htilde); G (K, K) = Ht Ht^T.
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
    """PFC1-3 from sufficient statistics, batched over a leading axis.

    Paper eq. 7-9; docs/metrics.md "The three PFC metrics".

    Args:
        n: number of samples N.
        trw_sum: (T,) sum_i ||h_i - m_{y_i}||^2.
        gram: (T, K, K) G = Ht Ht^T.
        correct: (T,) NCC hit counts.

    Returns:
        (T,) tensors keyed by the schema names PFC1, PFC2, PFC3, TR_SW, TR_SB.

    Raises:
        DegenerateFeaturesError: Tr Sigma_B = 0 (all class means equal).
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


def _pinv_diag(lam: Tensor, size: int, power: int = 1) -> Tensor:
    """lam^-power over the eigenvalues kept by pinv's default cutoff (eps * size * max|lam|),
    else 0."""
    keep = lam.abs() > torch.finfo(lam.dtype).eps * size * lam.abs().max()
    kept = torch.where(keep, lam, 1.0)
    return torch.where(keep, 1.0 / (kept.square() if power == 2 else kept), 0.0)


def nc1_from_gram(n: int, gram: Tensor, zz: Tensor) -> Tensor:
    """NC1 = Tr(Sigma_W Sigma_B^+) / K from K x K statistics (the K x K route, K <= d).

    Paper / reference: Papyan et al. (2020) NC1; docs/metrics.md "Classic NC metrics".
    With Sigma_B = Htilde Htilde^T / K, G = Htilde^T Htilde and Z_i = Htilde^T (h_i - m_{y_i}):
    (Htilde Htilde^T)^+ = Htilde G^{+2} Htilde^T, hence NC1 = Tr(G^+ (Z^T Z / N) G^+): one
    K x K eigendecomposition.

    Args:
        n: number of samples N.
        gram: (K, K) float64 G.
        zz: (K, K) float64 Z^T Z summed over the samples.

    Returns:
        0-d float64 tensor.
    """
    lam, vec = torch.linalg.eigh(gram)  # (K,), (K, K)
    inv2 = _pinv_diag(lam, gram.shape[0], power=2)
    return (inv2 * ((zz / n) @ vec * vec).sum(0)).sum()


def nc1_from_scatter(n: int, ht: Tensor, scatter: Tensor) -> Tensor:
    """NC1 = Tr(Sigma_W Sigma_B^+) / K from the d x d within-class scatter (the d x d route,
    d < K).

    Paper / reference: Papyan et al. (2020) NC1; docs/metrics.md "Classic NC metrics".
    Sigma_W = S_W / N with S_W = sum_i (h_i - m_{y_i})(h_i - m_{y_i})^T, Sigma_B = Ht^T Ht / K;
    one d x d eigendecomposition Sigma_B = V diag(lam) V^T gives
    Tr(Sigma_W Sigma_B^+) = sum_j lam_j^+ (V^T Sigma_W V)_jj.

    Args:
        n: number of samples N.
        ht: (K, d) float64 rows m_c - g.
        scatter: (d, d) float64 S_W.

    Returns:
        0-d float64 tensor.
    """
    k, d = ht.shape
    lam, vec = torch.linalg.eigh(ht.T @ ht / k)  # (d,), (d, d)
    inv = _pinv_diag(lam, max(k, d))
    return (inv * ((scatter / n) @ vec * vec).sum(0)).sum() / k


def nc2_from_gram(gram: Tensor) -> dict[str, Tensor]:
    """NC2 equinorm and equiangle of one layer from its Gram G (K, K) (docs/metrics.md).

    Paper / reference: Papyan et al. (2020) NC2; equinorm uses the unbiased std over classes
    (as their code: torch.std).

    Args:
        gram: (K, K) float64 G = Ht Ht^T.

    Returns:
        0-d tensors keyed by NC2_EQUINORM, NC2_EQUIANGLE.

    Raises:
        DegenerateFeaturesError: a class mean equals the global mean (cosine undefined).
    """
    k = gram.shape[0]
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
    return {NC2_EQUINORM: equinorm, NC2_EQUIANGLE: equiangle}


def nc_from_stats(n: int, gram: Tensor, zz: Tensor) -> dict[str, Tensor]:
    """NC1 (the K x K route, :func:`nc1_from_gram`) and NC2 (:func:`nc2_from_gram`).

    Paper / reference: Papyan et al. (2020); docs/metrics.md "Classic NC metrics".

    Args:
        n: number of samples N.
        gram: (K, K) float64 G.
        zz: (K, K) float64 Z^T Z.

    Returns:
        0-d tensors keyed by NC1, NC2_EQUINORM, NC2_EQUIANGLE.

    Raises:
        DegenerateFeaturesError: a class mean equals the global mean.
    """
    return {NC1: nc1_from_gram(n, gram, zz)} | nc2_from_gram(gram)


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
    if k >= GEO_FROBENIUS_MIN_K:
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


#: from this many classes on, the geodesic curve's PFC2(t) comes from 3 x 3 Frobenius inner
#: products (no (T, K, K) G(t)): T K^2 work per pass would otherwise rival the pass itself
GEO_FROBENIUS_MIN_K = 256


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
    gram_m = torch.stack([torch.stack([(a * b).sum() for b in mats]) for a in mats])  # (3, 3)
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
