"""The float64 reference of the collapse formulas, for every test that needs a brute force.

Independent of ``pfc_sweeps``' engine: plain numpy, every matrix built in full (the d x d
scatter matrices included), straight from the definitions of docs/metrics.md (paper eq. 7-9,
Papyan et al. for NC1-4). The one numerical choice is NC1's pseudo-inverse: Sigma_B has rank
at most K - 1 (the centred class means sum to zero), so :func:`pinv_rank` keeps its
``min(d, K - 1)`` largest singular values, and only those above ``max(d, K) * eps`` times
the largest. ``np.linalg.pinv``'s default cut (1e-15 of the largest) would invert the
rounding noise in Sigma_B's null directions on some builds (issue 20).
"""

from __future__ import annotations

import math

import numpy as np

from pfc_sweeps.results.schema import (
    NC1,
    NC2_EQUIANGLE,
    NC2_EQUINORM,
    NC3,
    NC4,
    PFC1,
    PFC2,
    PFC3,
    TR_SB,
    TR_SW,
)

#: NCC (and classifier) decisions closer than this, relative, may flip between two exact
#: computations in different orders: counted by :func:`layer_metrics` as ``"_ties"``.
TIE_RTOL = 1e-5


def class_means(h: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means (K, d) and their plain average g (d,) (docs/metrics.md "Notation")."""
    h = np.asarray(h, dtype=np.float64)
    means = np.stack([h[y == c].mean(axis=0) for c in range(num_classes)])  # (K, d)
    return means, means.mean(axis=0)


def ncc_distances(h: np.ndarray, means: np.ndarray, rows: int = 64) -> np.ndarray:
    """Squared distances ||h_i - m_c||^2, (N, K), as differences (no expansion), ``rows``
    samples at a time so that K = 1000 fits in memory."""
    h = np.asarray(h, dtype=np.float64)
    parts = [
        ((h[s : s + rows, None, :] - means[None]) ** 2).sum(-1) for s in range(0, len(h), rows)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, len(means)))


def ncc_predict(h: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Nearest-class-centre predictions (N,) (PFC3's classifier)."""
    return ncc_distances(h, class_means(h, y, num_classes)[0]).argmin(axis=1)


def pinv_rank(a: np.ndarray, rank: int) -> np.ndarray:
    """Pseudo-inverse of the symmetric PSD ``a`` on its ``rank`` largest singular values
    (and only those above ``max(a.shape) * eps`` of the largest)."""
    u, s, vt = np.linalg.svd(a)
    keep = np.arange(len(s)) < rank
    keep &= s > max(a.shape) * np.finfo(np.float64).eps * s.max()
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    return (vt.T * inv) @ u.T


def scatter(h: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Within-class Sigma_W = sum_i (h_i - m_yi)(h_i - m_yi)^T / N and between-class
    Sigma_B = sum_c (m_c - g)(m_c - g)^T / K, both (d, d)."""
    h = np.asarray(h, dtype=np.float64)
    means, g = class_means(h, y, num_classes)
    r = h - means[y]  # (N, d)
    ht = means - g  # (K, d)
    return r.T @ r / len(h), ht.T @ ht / num_classes


def layer_metrics(
    h: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> dict:
    """PFC1-3, NC1, NC2, the traces and, with a classifier (K, d), NC3 and NC4 of one layer.

    Also ``"_ncc"`` (N,) NCC predictions, ``"_ht"`` (d, K) centred means and ``"_ties"``
    the number of near-tied decisions (:data:`TIE_RTOL`), which a float32 computation may
    decide either way.
    """
    h, y, k = np.asarray(h, dtype=np.float64), np.asarray(y), num_classes
    means, g = class_means(h, y, k)
    sw, sb = scatter(h, y, k)
    ht = (means - g).T  # (d, K)
    gram = ht.T @ ht  # (K, K)
    etf = (np.eye(k) - 1.0 / k) / math.sqrt(k - 1)
    dist = ncc_distances(h, means)  # (N, K)
    norms = np.linalg.norm(ht, axis=0)
    cos = gram / np.outer(norms, norms)
    off = ~np.eye(k, dtype=bool)
    part = np.sort(dist, axis=1)
    out = {
        PFC1: np.trace(sw) / np.trace(sb),
        PFC2: np.linalg.norm(gram / np.linalg.norm(gram) - etf),
        PFC3: float((dist.argmin(1) == y).mean()),
        NC1: np.trace(sw @ pinv_rank(sb, min(h.shape[1], k - 1))) / k,
        NC2_EQUINORM: np.std(norms, ddof=1) / np.mean(norms),
        NC2_EQUIANGLE: np.mean(np.abs(cos[off] + 1 / (k - 1))),
        TR_SW: np.trace(sw),
        TR_SB: np.trace(sb),
        "_ncc": dist.argmin(1),
        "_ht": ht,
        "_ties": int(
            ((part[:, 1] - part[:, 0]) <= TIE_RTOL * (part[:, 0] + norms.max() ** 2)).sum()
        ),
    }
    if weight is not None:
        w = np.asarray(weight, dtype=np.float64)
        out[NC3] = np.linalg.norm(w / np.linalg.norm(w) - ht.T / np.linalg.norm(ht)) ** 2
        logits = h @ w.T + (0 if bias is None else np.asarray(bias, dtype=np.float64))
        top = np.sort(logits, axis=1)
        out[NC4] = float((logits.argmax(1) != out["_ncc"]).mean())
        out["_ties"] += int(((top[:, -1] - top[:, -2]) <= TIE_RTOL * np.abs(logits).max(1)).sum())
    return out
