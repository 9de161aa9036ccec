"""The sufficient-statistics algebra of the metrics: class moments, K x K Grams, NCC scores,
and the metrics from them (docs/metrics.md, paper eq. 7-9); the geodesic prediction
(eq. 17-19) is in :mod:`pfc_sweeps.collapse.geodesic`.

Every function works on the device of its inputs; the metrics compute in float64. All are
pure except the in-place helpers whose names end in ``_`` (symmetric products in blocks).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from pfc_sweeps.collapse.inputs import (
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
    TR_SB,
    TR_SW,
)

# --------------------------------------------------------------------------------------------
# streaming kernels (pass 1: class sums; pass 2: everything that needs the final means)
# --------------------------------------------------------------------------------------------
#: symmetric products (:func:`sym_gram`, the d x d scatters) are formed in blocks of about
#: this many rows, the upper block triangle only (a single block below 1.5x this)
SYM_GRAM_BLOCK = 128


def gram_edges(n: int) -> list[int]:
    """Block edges [0, ..., n] of an (n, n) symmetric product (:data:`SYM_GRAM_BLOCK`)."""
    parts = max(1, round(n / SYM_GRAM_BLOCK))
    return [n * i // parts for i in range(parts + 1)]


def add_upper_gram_(acc: Tensor, x: Tensor, edges: list[int], beta: float = 1.0) -> Tensor:
    """acc = beta acc + x^T x on the blocks on and above the diagonal (``edges``); the blocks
    below are left as they are (:func:`mirror_upper_` fills them). Timings: docs/benchmarks.md
    "Many classes".

    Args:
        acc: (d, d), updated in place.
        x: (b, d).
        edges: :func:`gram_edges` (d).
        beta: 1 accumulates; 0 overwrites (acc may then hold anything, even NaN).

    Returns:
        acc.
    """
    for lo, hi in itertools.pairwise(edges):
        acc[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:], beta=beta)  # (b_i, d - lo)
    return acc


def mirror_upper_(a: Tensor, edges: list[int]) -> Tensor:
    """The blocks of a (d, d) below its diagonal blocks set from those above; returns a."""
    for lo, hi in itertools.pairwise(edges[1:]):
        a[lo:hi, :lo] = a[:lo, lo:hi].T
    return a


def sym_gram(a: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ a.T (n, n) for a (n, m), from the GEMMs of its upper block triangle only, mirrored
    (:func:`gram_edges`); written into ``out`` (n, n) when given."""
    n = a.shape[0]
    edges = gram_edges(n)
    out = a.new_empty(n, n) if out is None else out  # beta = 0 below: no zero fill
    return mirror_upper_(add_upper_gram_(out, a.T, edges, beta=0.0), edges)


def class_moments(
    counts: Tensor, sums: Tensor, gram_out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class means, global mean, Htilde and its Gram from pass-1 sums.

    Paper section III (notation); docs/metrics.md "Notation".

    Args:
        counts: (K,) float64 class counts (all > 0).
        sums: (K, d) float64 class sums.
        gram_out: (K, K) where to write G, or None (a new tensor).

    Returns:
        means (K, d); g (d,) the mean of the class means; Ht (K, d) rows m_k - g (the
        transpose of docs/metrics.md's Htilde); G (K, K) = Ht Ht^T.
    """
    means = sums / counts[:, None]  # (K, d)
    g = means.mean(dim=0)  # (d,)
    ht = means - g  # (K, d)
    gram = sym_gram(ht, out=gram_out)  # (K, K)
    return means, g, ht, gram


def ncc_scores(proj: Tensor, gram_diag: Tensor) -> Tensor:
    """NCC scores: ||h - m_c||^2 up to the per-sample constant ||h - g||^2 (PFC3, paper eq. 9).

    ||h - m_c||^2 - ||h - g||^2 = ||m_c - g||^2 - 2 <h - g, m_c - g> (docs/metrics.md "PFC3").

    Args:
        proj: (B, K) projections (h - g) Htilde^T of B samples onto the centred class means.
        gram_diag: (K,) ||m_c - g||^2, the diagonal of the Gram G.

    Returns:
        (B, K) scores; their argmin over K is the NCC prediction.
    """
    return gram_diag - 2.0 * proj  # (B, K)


def centered(x: Tensor, g: Tensor) -> Tensor:
    """Features centred on the global mean, in float64 (docs/metrics.md "Notation").

    Args:
        x: (B, d) features of any float dtype.
        g: (d,) the global mean g (the plain average of the class means).

    Returns:
        (B, d) float64 u = x - g, a new tensor (cast, then subtract in place).
    """
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
    """The within-class cross term of the geodesic prediction, times N (paper eq. 17-19).

    sum_i <h0_i - m0_{y_i}, hL_i - mL_{y_i}> = <u0, uL> - <u0, HtL_y> - <uL, Ht0_y>
    + <Ht0_y, HtL_y>, so Tr Sigma_W(t) needs no (d, d) matrix (docs/metrics.md "Geodesic").

    Args:
        u0, ul: (B, d) float64 features of layers 0 and L centred on their global means.
        c01, c10: (B, K) u0 HtL^T and uL Ht0^T.
        x01: (K, K) Ht0 HtL^T.
        labels: (B,) int64 classes.

    Returns:
        0-d float64 sum over the B samples.
    """
    col = labels[:, None]
    return (
        torch.dot(u0.reshape(-1), ul.reshape(-1))
        - c01.gather(1, col).sum()
        - c10.gather(1, col).sum()
        + x01.diagonal().index_select(0, labels).sum()
    )


def ncc_correct_from_scores(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """NCC hits per t: how many samples have argmin_c scores[c, t, i] == labels[i] (PFC3).

    The same decision as argmin, ties to the lowest c, exactly: y is the lowest-index argmin
    iff s_y < s_c for all c != y, except that s_y == s_c is allowed for c > y. One reduction
    over the leading K axis (much faster than argmin over a short inner axis on CPU); exact
    ties take a slower path.

    Args:
        scores: (K, T, B) scores, class-major; overwritten (scratch).
        labels: (B,) int64 classes.
        mask: (B,) bool, count only these samples; None: all.

    Returns:
        (T,) int64 counts.
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
    return {
        PFC1: tr_sw / tr_sb,
        PFC2: pfc2_from_gram(gram),
        PFC3: correct.to(F64) / n,
        TR_SW: tr_sw,
        TR_SB: tr_sb,
    }


#: from this many classes on, PFC2 (per layer and along the geodesic) comes from Frobenius
#: inner products instead of the (K, K) matrix G/||G|| - E: several K x K passes per layer
#: would rival the pass itself
FROBENIUS_MIN_K = 256


def pfc2_from_gram(gram: Tensor) -> Tensor:
    """PFC2 = ||G/||G||_F - E||_F, E the unit-norm simplex ETF (paper eq. 8), batched.

    Paper eq. 8; docs/metrics.md "The three PFC metrics". From FROBENIUS_MIN_K classes on,
    ||G/||G|| - E||^2 = 2 - 2 <G, E>/||G|| with <G, E> = (Tr G - 1^T G 1 / K)/sqrt(K - 1):
    rounding ~ eps / PFC2^2 relative (below 1e-8 for PFC2 > 1e-4).

    Args:
        gram: (T, K, K) float64 Grams G = Ht Ht^T.

    Returns:
        (T,) float64.
    """
    k = gram.shape[-1]
    gnorm = torch.linalg.matrix_norm(gram)  # (T,) Frobenius
    if k >= FROBENIUS_MIN_K:
        trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
        inner = (trace - gram.sum((-2, -1)) / k) / math.sqrt(k - 1)
        return (2.0 - 2.0 * inner / gnorm).clamp_min(0).sqrt()
    etf = simplex_etf(k, device=gram.device)
    return torch.linalg.matrix_norm(gram / gnorm[:, None, None] - etf)


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
    sigma_b = sym_gram(ht.T).div_(k)  # (d, d)
    chol, info = torch.linalg.cholesky_ex(sigma_b)
    if int(info) == 0:  # well conditioned: pinv = inverse, a Cholesky costs ~1/4 of an eigh
        inv = torch.cholesky_inverse(chol)  # (d, d)
        # ||A||_F ||A^-1||_F >= ||A||_2 ||A^-1||_2 = cond(A): below _CHOL_MAX_COND every
        # eigenvalue is far above the pinv cutoff and the inverse is accurate to ~cond * eps
        if float(torch.linalg.norm(sigma_b) * torch.linalg.norm(inv)) < _CHOL_MAX_COND:
            return (inv * scatter).sum() / (n * k)  # Tr(A B) = sum(A * B), both symmetric
    lam, vec = torch.linalg.eigh(sigma_b)  # (d,), (d, d)
    inv = _pinv_diag(lam, max(k, d))
    return (inv * ((scatter / n) @ vec * vec).sum(0)).sum() / k


#: nc1_from_scatter takes the Cholesky route when ||Sigma_B||_F ||Sigma_B^-1||_F is below this
_CHOL_MAX_COND = 1e6


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
    inv = 1.0 / norms
    rows = max(1, _NC2_BLOCK_ELEMENTS // k)  # |cos + 1/(K-1)| a cache-sized block at a time
    buf = gram.new_empty(min(rows, k), k)
    total = gram.new_zeros(())
    for lo in range(0, k, rows):
        hi = min(lo + rows, k)
        cos = torch.mul(gram[lo:hi], inv[lo:hi, None], out=buf[: hi - lo]).mul_(inv)  # (b, K)
        total += cos.add_(1.0 / (k - 1)).abs_().sum()
    diag = (torch.diagonal(gram) * inv * inv + 1.0 / (k - 1)).abs()  # (K,) the same per entry
    equiangle = (total - diag.sum()) / (k * (k - 1))  # off-diagonal mean
    return {NC2_EQUINORM: equinorm, NC2_EQUIANGLE: equiangle}


#: nc2_from_gram forms the cosines in row blocks of this many elements (1 MiB in float64)
_NC2_BLOCK_ELEMENTS = 2**17


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
