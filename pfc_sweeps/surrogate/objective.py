"""MUFM and UFM surrogate models, solved by batched full-batch gradient descent.

The paper's surrogate models (eq. 13 and eq. 2, Theorem 4, section IV-B).

Notation: X (d, N) data, H (d, N) last-layer features, W (K, d) classifier,
Y = I_K (x) 1_n^T (K, N) one-hot targets, N = K n samples ordered class by class.

    MUFM:  F(W, H) = L(W H, Y) + lam_w/(2K) ||W||_F^2 + lam/(2N) ||H - X||_F^2      (eq. 13)
    UFM:   F(W, H) = L(W H, Y) + lam_w/(2K) ||W||_F^2 + lam/(2N) ||H||_F^2          (eq. 2)

with L = mean cross-entropy over the N samples (``loss="ce"``) or
L = 1/(2N) ||W H - Y||_F^2 (``loss="mse"``). For balanced classes N = K n, which is the
paper's scaling; unbalanced labels are accepted and use N.

A grid of (model, seed, lam) configurations is solved as one tensor program: W (B, K, d),
H (B, d, N), every step a handful of batched matmuls, no Python loop over the grid.
Every configuration with the same seed starts from the same N(0, 1) draw of (W, H), so a
batched solve equals the per-configuration solves up to float rounding.

Step sizes (our choice; the paper does not fix them): W moves with ``lr`` times the gradient of F; with
``h_step="per_sample"`` every column h_i moves with ``lr`` times the gradient of its own
sample's terms, i.e. the H learning rate is ``lr * N``; ``h_step="mean"`` uses ``lr`` for H
too (the literal gradient of the mean objective, under which UFM barely moves in 5e4 steps);
``"per_class"`` uses ``lr * n`` (= lr N / K).

Step-size guard (``h_step_guard=True``, the default; a deviation from plain GD). Each column
h_i takes a step s = lr_h / N (= lr for the per-sample step) on its own terms, whose Hessian is
W^T W + lam I for MSE, so the H step is stable only while s (||W||_2^2 + lam) < 2. With N(0, 1)
initialisation ||W_0||_2^2 is far above 2 / lr for the paper's lr = 0.1, so plain GD survives
only if W shrinks fast enough, and for some init seeds (the default 0 among them) it diverges
within a few steps. The guard caps the step, per step and per configuration, at a fixed
fraction c / 2 of its stability limit:

    s_b = min(s, c / (curv ||W_b||_2^2 + lam_b)),     c = H_STEP_GUARD_C = 1.9,

curv = 1 for MSE and 1/2 for CE (the softmax Hessian diag(p) - p p^T is <= I / 2, so the CE
per-sample Hessian is <= W^T W / 2 + lam I). ||W_b||_2^2 is the largest eigenvalue of the
K x K Gram W_b W_b^T (``torch.linalg.eigvalsh``), computed only on the steps where the cheap
bound ||W_b||_2 <= ||W_b||_F does not already show that the cap is inactive. Steps that plain
GD takes below c / 2 of the limit are unchanged, bit for bit. The guard changes the transient,
not the problem: the stationary points do not depend on the step size, and near the solutions
||W||_2^2 is far below the cap, so the last iterations are plain GD. c = 1.9 (a 5% margin)
rather than 1 lets the iterate leave the unstable start through a few large steps, as plain
GD does, instead of shrinking W through the weight decay alone. The W step is not guarded
(its curvature lr (||H||_2^2 / N + lam_w / K) is small in the paper setting). For CE the cap
is a worst case. Plain GD on every step: ``h_step_guard=False``. How often the guard acts,
measured: docs/surrogate.md ("The solver, measured").

Divergence raises SurrogateDivergedError (checked every 100 steps and at every logged step),
never NaN rows: non-finite values, or an objective that grew GROWTH_LIMIT-fold above its start
(gradient descent from a too-large ``lr`` can grow without bound and stay finite).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from pfc_sweeps.data.builtin import gaussian_mixture

METHODS = ("auto", "direct", "subspace")
TABLE_COLUMNS = ("model", "lam", "lam_w", "epoch", "metric", "value")
#: c of the H step guard: the per-sample H step is capped at c / (curv ||W||_2^2 + lam), i.e. at
#: c / 2 of its stability limit (module docstring, "Step-size guard")
H_STEP_GUARD_C = 1.9
#: A config diverged when its objective exceeds GROWTH_LIMIT * max(F(W_0, H_0), 1): gradient
#: descent that works decreases F, so a million-fold rise is growth without bound.
GROWTH_LIMIT = 1e6
_CHECK_EVERY = 100  # steps between checks of W and F (divergence shows there first)


class SurrogateDivergedError(FloatingPointError):
    """Gradient descent produced non-finite values or an objective that grew without bound
    (the step is too large for the iterate).

    Attributes: ``step`` (the step where it was detected) and ``configs`` (the diverged
    (model, seed, lam) triples).
    """

    def __init__(
        self,
        step: int,
        configs: Sequence[tuple[str, int, float]],
        *,
        guarded: bool = False,
        reason: str = "non-finite values",
    ):
        self.step = step
        self.configs = list(configs)
        shown = ", ".join(f"{m} seed={s} lam={lam:g}" for m, s, lam in self.configs[:5])
        more = f" (+{len(self.configs) - 5} more)" if len(self.configs) > 5 else ""
        hint = (
            "the H step was guarded; the W step is stable only while "
            "lr (||H||_2^2 / N + lam_w / K) < 2: try a smaller lr"
            if guarded
            else "the H step is stable only while lr_H/N * (||W||_2^2 + lam) < 2; "
            "use h_step_guard=True (the default), a smaller lr, or h_step='mean'"
        )
        super().__init__(
            f"surrogate gradient descent diverged ({reason}) by step {step} "
            f"for {shown}{more}: {hint}"
        )


# -------------------------------------------------------------------------------------- checks


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")


def _check_float(name: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        what = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number {what}")


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {list(allowed)}")


def _check_dtype(dtype: object) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r} is invalid: expected torch.float32 or torch.float64")


def _as_list(name: str, value: object) -> list:
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if isinstance(value, str | numbers.Number):
        return [value]
    try:
        out = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{name}={value!r} is invalid: expected a value or a sequence") from None
    if not out:
        raise ValueError(f"{name}=[] is invalid: expected at least one value")
    return out


# --------------------------------------------------------------------------------------
# data and targets


def make_gaussian_data(
    num_classes: int = 5,
    d: int = 20,
    n: int = 100,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian data of the surrogate experiments (paper section IV-B).

    mu_k uniform on the unit sphere of R^d (normalised standard normal), x_{k,i} ~ N(mu_k, I_d),
    samples ordered class by class so that the targets are Y = I_K (x) 1_n^T.
    Drawn on the CPU in float64 from ``torch.Generator().manual_seed(seed)`` (so the draw is
    the same on every device), then cast.

    Returns:
        X (d, K*n) and labels (K*n,) int64, labels = [0]*n + [1]*n + ... + [K-1]*n.
    """
    K = num_classes
    _check_int("num_classes", K, 2)
    _check_int("d", d, 1)
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    _check_dtype(dtype)
    ((x, labels),) = gaussian_mixture(K, d, [n], seed=seed)  # (N, d), (N,)
    X = x.T.contiguous()  # (d, N)
    return X.to(device=device, dtype=dtype), labels.to(device=device)


def one_hot_targets(
    labels: torch.Tensor, num_classes: int, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Y (K, N) with Y[k, i] = 1 iff labels[i] == k (= I_K (x) 1_n^T for ordered labels)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).T.to(dtype).contiguous()


# --------------------------------------------------------------------------------------
# objective, gradients, closed form (pure functions; batched over a leading B axis)


def _lam_col(lam: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """lam as a (B, 1, 1) (or scalar) tensor broadcastable against (B, d, N)."""
    lam_t = torch.as_tensor(lam, dtype=ref.dtype, device=ref.device)
    return lam_t.reshape(-1, 1, 1) if lam_t.ndim == 1 else lam_t


def objective(
    W: torch.Tensor,
    H: torch.Tensor,
    anchor: torch.Tensor,
    Y: torch.Tensor,
    lam: torch.Tensor | float,
    lam_w: float,
    loss: str = "mse",
) -> torch.Tensor:
    """F(W, H) of paper eq. 13 (anchor = X) or eq. 2 (anchor = 0), batched.

    Args:
        W: (B, K, d); H: (B, d, N); anchor: broadcastable to (B, d, N); Y: (K, N);
        lam: float or (B,); lam_w: float; loss: "mse" or "ce".

    Returns:
        (B,) objective values.
    """
    K, N = Y.shape
    Z = W @ H  # (B, K, N)
    if loss == "mse":
        fit = (Z - Y).square().sum(dim=(-2, -1)) / (2 * N)
    else:
        fit = (torch.logsumexp(Z, dim=-2) - (Z * Y).sum(dim=-2)).mean(dim=-1)
    lam_b = torch.as_tensor(lam, dtype=H.dtype, device=H.device)
    reg_w = lam_w / (2 * K) * W.square().sum(dim=(-2, -1))
    reg_h = lam_b / (2 * N) * (H - anchor).square().sum(dim=(-2, -1))
    return fit + reg_w + reg_h


def gradients(
    W: torch.Tensor,
    H: torch.Tensor,
    anchor: torch.Tensor,
    Y: torch.Tensor,
    lam: torch.Tensor | float,
    lam_w: float,
    loss: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic gradient (dF/dW (B, K, d), dF/dH (B, d, N)) of :func:`objective`.

    With R = dL/dZ * N (MSE: R = W H - Y; CE: R = softmax(W H) - Y, softmax over classes):
        dF/dW = R H^T / N + (lam_w / K) W,     dF/dH = W^T R / N + (lam / N) (H - anchor).
    """
    K, N = Y.shape
    R = _residual(W @ H, Y, loss)  # (B, K, N)
    gW = R @ H.mT / N + (lam_w / K) * W  # (B, K, d)
    gH = W.mT @ R / N + _lam_col(lam, H) / N * (H - anchor)  # (B, d, N)
    return gW, gH


def _residual(Z: torch.Tensor, Y: torch.Tensor, loss: str) -> torch.Tensor:
    """N * dL/dZ for logits Z (B, K, N): Z - Y (MSE) or softmax_K(Z) - Y (CE)."""
    if loss == "mse":
        return Z - Y
    return torch.softmax(Z, dim=-2) - Y


def closed_form_w(H: torch.Tensor, Y: torch.Tensor, lam_w: float) -> torch.Tensor:
    """Minimiser over W of the MSE objective for fixed H (paper, Theorem 4).

    Setting dF/dW = (W H - Y) H^T / N + (lam_w / K) W = 0 gives
        W*(H) = Y H^T (H H^T + (N / K) lam_w I_d)^{-1},
    which is Theorem 4's Y H^T (H H^T + n lam_w I_d)^{-1} since N / K = n for balanced
    classes (the objective and Theorem 4 agree). The matrix is SPD for lam_w > 0.

    Args:
        H: (d, N) or (B, d, N); Y: (K, N); lam_w > 0 (or H H^T invertible).

    Returns:
        W* with shape (K, d) or (B, K, d).
    """
    K, N = Y.shape
    d = H.shape[-2]
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    A = H @ H.mT + (N / K) * lam_w * eye  # (..., d, d), symmetric
    # W* A = Y H^T  <=>  A W*^T = H Y^T  (A symmetric)
    return torch.linalg.solve(A, H @ Y.T.to(H.dtype)).mT  # (..., K, d)


def alignment(H: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """||H/||H||_F - X/||X||_F||_F (paper, Fig. 5); batched over B."""
    Hn = H / torch.linalg.matrix_norm(H).reshape(*H.shape[:-2], 1, 1)
    Xn = X / torch.linalg.matrix_norm(X)
    return torch.linalg.matrix_norm(Hn - Xn)
