"""The batched full-batch gradient-descent solver of the surrogate models (paper section IV-B) and its λ grid.

The objective, its gradients and the data are in :mod:`pfc_sweeps.surrogate.objective`; the solver's options and the step-size guard are described there.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from pfc_sweeps.choices import H_STEPS, LOSSES
from pfc_sweeps.collapse.metrics import pfc_metrics
from pfc_sweeps.results.schema import DATA_MODEL, PFC_METRICS, SURROGATE_METRICS, SURROGATE_MODELS
from pfc_sweeps.surrogate.objective import (
    _CHECK_EVERY,
    GROWTH_LIMIT,
    H_STEP_GUARD_C,
    METHODS,
    TABLE_COLUMNS,
    SurrogateDivergedError,
    _as_list,
    _check_choice,
    _check_dtype,
    _check_float,
    _check_int,
    alignment,
    gradients,
    objective,
    one_hot_targets,
)

# --------------------------------------------------------------------------------------
# solver


@dataclass
class SurrogateResult:
    """Output of :func:`solve_batched`.

    Attributes:
        table: tidy DataFrame [model, lam, lam_w, epoch, metric, value] (+ seed, see solve_grid).
        W: (B, K, d) final classifiers; H: (B, d, N) final features.
        configs: the B (model, seed, lam) triples, in the order of W and H's first axis
            (itertools.product(models, seeds, lams)).
        steps: number of gradient steps taken.
        guarded_steps: per configuration, the number of steps whose H step the guard
            shortened (all 0 with ``h_step_guard=False``; see the module docstring).
    """

    table: pd.DataFrame
    W: torch.Tensor
    H: torch.Tensor
    configs: list[tuple[str, int, float]]
    steps: int
    guarded_steps: list[int]


def _validate_data(X: object, labels: object, K: int) -> None:
    if not isinstance(X, torch.Tensor) or X.ndim != 2:
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X with shape {shape} is invalid: expected a (d, N) tensor")
    if not X.is_floating_point():
        raise ValueError(f"X.dtype={X.dtype} is invalid: expected a floating-point tensor")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ValueError("labels is invalid: expected a 1-D integer tensor of shape (N,)")
    d, N = X.shape
    if labels.shape[0] != N:
        raise ValueError(f"labels has {labels.shape[0]} entries: expected N={N} (X is (d, N))")
    if d < K - 1:
        raise ValueError(f"d={d} is invalid: expected d >= K-1 = {K - 1} (X has shape (d, N))")
    if N < K:
        raise ValueError(f"N={N} samples is invalid: expected n >= 1 sample per class (N >= K)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"labels range [{lo}, {hi}] is invalid: expected values in [0, {K - 1}]")
    counts = torch.bincount(labels.long().cpu(), minlength=K)
    if int(counts.min()) < 1:
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no samples: expected n >= 1 per class")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or inf: expected finite data")


def _use_subspace(method: str, loss: str, d: int, K: int, N: int) -> bool:
    return method == "subspace" or (method == "auto" and loss == "mse" and 2 * d + K < N)


def _pfc(features: torch.Tensor, labels: torch.Tensor, K: int) -> list[float]:
    """[pfc1, pfc2, pfc3] of features (d, N) via the metric engine (samples x dims: pass H^T)."""
    out = pfc_metrics(features.T, labels, K)
    return [float(out[k]) for k in PFC_METRICS]


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, restoring it after (None: no change)."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_draw(seed: int, K: int, d: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (K, d), H0 (d, N) ~ N(0, 1), drawn on the CPU in float64 (same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(K, d, generator=gen, dtype=torch.float64)  # (K, d)
    H0 = torch.randn(d, N, generator=gen, dtype=torch.float64)  # (d, N)
    return W0, H0


@dataclass(frozen=True)
class SurrogateProblem:
    """One grid of surrogate solves: every (model, seed, lam) of ``models x seeds x lams``.

    Plain full-batch gradient descent from W, H ~ N(0, 1) (one CPU float64 draw per seed,
    shared by every model and lam with that seed), both blocks updated from the same iterate:
        W <- W - lr dF/dW,    H <- H - lr_H dF/dH,
    lr_H = lr * N (``h_step="per_sample"``: each h_i takes an ``lr`` step on its own sample's
    terms, our choice), lr * N / K = lr * n (``"per_class"``) or lr (``"mean"``).
    ``h_step_guard``: on the steps where that H step would be at or beyond its stability
    limit, lr_H is shortened per configuration to N * H_STEP_GUARD_C / (curv ||W||_2^2 + lam)
    (curv = 1 MSE, 1/2 CE); every other step is plain GD, bit for bit (module docstring).

    ``method``: "direct" iterates on H (B, d, N). "subspace" (MSE only) iterates on the
    coordinates of H's rows in an orthonormal basis (N, D) of the row span of [H0; X; Y],
    D = 2d + K: the MSE step is affine in H with only H0, X and Y as sources, so H never
    leaves that span and the iterates are the same up to rounding, at D/N of the cost.
    "auto" = subspace for MSE when D < N.

    Fields: X (d, N) data; labels (N,) ints in [0, K), every class present; num_classes = K >= 2,
    d >= K-1; lams >= 0; lam_w >= 0; lr > 0; steps >= 1; log_every >= 1 or None (first and
    last step only); ``seed_column``: the table gets an Int64 ``seed`` column; ``device``:
    where to solve (None: X's device); dtype float64 or float32; ``log_data``: log pfc1-3 of
    X as model="data" rows. Construction checks every field and raises ``ValueError``.
    """

    X: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    lams: tuple[float, ...]
    lam_w: float = 0.005
    models: tuple[str, ...] = ("mufm",)
    seeds: tuple[int, ...] = (0,)
    seed_column: bool = False
    loss: str = "mse"
    lr: float = 0.1
    steps: int = 50_000
    log_every: int | None = 1000
    h_step: str = "per_sample"
    h_step_guard: bool = True
    device: torch.device | str | None = None
    dtype: torch.dtype = torch.float64
    log_data: bool = True
    method: str = "auto"

    def __post_init__(self) -> None:
        _check_int("num_classes", self.num_classes, 2)
        for m in self.models:
            _check_choice("model", m, SURROGATE_MODELS)
        for lam in self.lams:
            _check_float("lam", lam, positive=False)
        _check_float("lam_w", self.lam_w, positive=False)
        _check_choice("loss", self.loss, LOSSES)
        _check_float("lr", self.lr, positive=True)
        _check_int("steps", self.steps, 1)
        if self.log_every is not None:
            _check_int("log_every", self.log_every, 1)
        _check_choice("h_step", self.h_step, H_STEPS)
        if not isinstance(self.h_step_guard, bool):
            raise ValueError(
                f"h_step_guard={self.h_step_guard!r} is invalid: expected True or False"
            )
        for s in self.seeds:
            _check_int("seed", s, 0)
        _check_dtype(self.dtype)
        _check_choice("method", self.method, METHODS)
        if self.method == "subspace" and self.loss != "mse":
            raise ValueError(
                f"method='subspace' with loss={self.loss!r} is invalid: it needs loss='mse'"
            )
        _validate_data(self.X, self.labels, self.num_classes)

    @property
    def configs(self) -> list[tuple[str, int, float]]:
        """The B (model, seed, lam) triples, in the order itertools.product(models, seeds, lams)."""
        grid = itertools.product(self.models, self.seeds, self.lams)
        return [(m, int(s), float(lam)) for m, s, lam in grid]


def solve_batched(
    X: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lams: float | Sequence[float],
    lam_w: float = 0.005,
    *,
    models: str | Sequence[str] = "mufm",
    seeds: int | Sequence[int] = 0,
    num_threads: int | None = 1,
    callback: Callable[[int, pd.DataFrame], None] | None = None,
    **options: Any,
) -> SurrogateResult:
    """Solve MUFM/UFM (paper eq. 13 / eq. 2) for the grid models x seeds x lams at once.

    ``options`` are the other fields of :class:`SurrogateProblem` (loss, lr, steps,
    log_every, h_step, h_step_guard, device, dtype, log_data, method), which also says how
    the problem is solved. ``models``, ``seeds`` and ``lams`` are a value or a sequence
    (a sequence of seeds gives the table an Int64 "seed" column).

    Logged at step 0, every ``log_every`` steps and at the last step, one row per (config,
    metric) with the metric names of SURROGATE_METRICS: pfc1, pfc2, pfc3 of H
    (``pfc_sweeps.collapse.metrics.pfc_metrics`` on H^T), alignment ||H/||H||_F - X/||X||_F||_F,
    objective F(W, H), and grad_norm = sqrt(||dF/dW||_F^2 + ||dF/dH||_F^2), the norm of the
    gradient of F itself whatever ``h_step`` is. With ``log_data`` the pfc1-3 of X are logged
    at step 0 and at the last step as rows with model="data", lam=NaN, lam_w=NaN.
    ``callback(step, rows)`` runs after each logged step, with that step's rows.

    ``num_threads``: torch intra-op threads during the solve (restored after; None: leave as
    is); 1 is fastest for these small matrices (docs/surrogate.md, "The solver, measured").

    Raises:
        ValueError: bad input, before any work. SurrogateDivergedError: non-finite values, or
        an objective that grew :data:`GROWTH_LIMIT`-fold above its start (checked every 100
        steps and at every logged step).
    """
    problem = SurrogateProblem(
        X,
        labels,
        num_classes,
        tuple(_as_list("lams", lams)),
        lam_w,
        models=tuple(_as_list("models", models)),
        seeds=tuple(_as_list("seeds", seeds)),
        seed_column=not isinstance(seeds, numbers.Integral),
        **options,
    )
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)
    with _torch_threads(num_threads):
        return _Solver(problem, callback).run()


class _Solver:
    """Gradient descent on a :class:`SurrogateProblem`: the batched state and its steps."""

    def __init__(self, p: SurrogateProblem, callback: Callable[[int, pd.DataFrame], None] | None):
        self.p, self.callback = p, callback
        device = torch.device(p.device) if p.device is not None else p.X.device
        dtype, K = p.dtype, p.num_classes
        d, N = p.X.shape
        self.configs = p.configs
        B = len(self.configs)
        self.X = p.X.to(device=device, dtype=dtype)  # (d, N)
        self.lab = p.labels.to(device=device).long()  # (N,)
        self.Y = one_hot_targets(self.lab, K, dtype=dtype)  # (K, N)
        seeds = [int(s) for s in p.seeds]
        inits = {s: _init_draw(s, K, d, N) for s in seeds}
        cfg_seeds = [s for _, s, _ in self.configs]
        self.W = torch.stack([inits[s][0] for s in cfg_seeds]).to(device=device, dtype=dtype)
        H0 = torch.stack([inits[s][1] for s in cfg_seeds]).to(device=device, dtype=dtype)
        self.lam_t = torch.tensor([c[2] for c in self.configs], dtype=dtype, device=device)  # (B,)
        is_mufm = torch.tensor([c[0] == "mufm" for c in self.configs], dtype=dtype, device=device)
        self.anchor = is_mufm.reshape(B, 1, 1) * self.X  # (B, d, N): X for MUFM, 0 for UFM

        lr, lam_w = float(p.lr), float(p.lam_w)
        lr_h = {"per_sample": lr * N, "per_class": lr * N / K, "mean": lr}[p.h_step]
        # W <- (1 - lr lam_w / K) W - (lr / N) R H^T,  R = N dL/dZ  (the objective above)
        self.beta_w, self.alpha_w = 1.0 - lr * lam_w / K, -lr / N
        # H <- (1 - c) H + c anchor - (lr_h / N) W^T R,  c = lr_h lam / N  (per config)
        lam_b = self.lam_t.reshape(B, 1, 1)  # (B, 1, 1)
        self.c = (lr_h / N) * lam_b  # (B, 1, 1)
        self.keep_h, self.alpha_h = 1.0 - self.c, -lr_h / N
        self.guard = _HStepGuard(lr_h / N, lam_b, p.loss) if p.h_step_guard else None
        basis = None
        if _use_subspace(p.method, p.loss, d, K, N):
            # basis of the row span of [H0; X; Y] for each seed (see SurrogateProblem)
            basis = {
                s: torch.linalg.qr(
                    torch.cat([inits[s][1].to(device=device, dtype=dtype), self.X, self.Y]).T
                ).Q
                for s in seeds
            }  # (N, D) each
        self._set_coordinates(H0, basis, cfg_seeds)
        self.rows: list[tuple] = []
        self.data_pfc = _pfc(self.X, self.lab, K) if p.log_data else []
        self.obj0: torch.Tensor | None = None

    def _set_coordinates(self, H0: torch.Tensor, basis: dict | None, cfg_seeds: list) -> None:
        """The iterate Hs: H itself (B, d, N), or its coordinates (B, d, D) in ``basis``."""
        if basis is None:
            self.Q = None
            self.Hs = H0  # (B, d, N)
            self.negYs = -self.Y  # (K, N)
            self.anchor_s = self.anchor  # (B, d, N)
        else:
            self.Q = torch.stack([basis[s] for s in cfg_seeds])  # (B, N, D)
            self.Hs = H0 @ self.Q  # (B, d, D) coordinates of H
            self.negYs = -(self.Y @ self.Q)  # (B, K, D)
            self.anchor_s = self.anchor @ self.Q  # (B, d, D)
        self.c_anchor = self.c * self.anchor_s  # (B, d, N|D)

    def full_h(self) -> torch.Tensor:
        return self.Hs if self.Q is None else self.Hs @ self.Q.mT  # (B, d, N)

    def _objective(self, H: torch.Tensor) -> torch.Tensor:
        p = self.p
        return objective(self.W, H, self.anchor, self.Y, self.lam_t, float(p.lam_w), p.loss)

    def _diverged(self, step: int, bad: torch.Tensor, reason: str) -> SurrogateDivergedError:
        configs = [self.configs[i] for i in bad.nonzero().flatten().tolist()]
        return SurrogateDivergedError(step, configs, guarded=self.p.h_step_guard, reason=reason)

    def _check_growth(self, step: int, obj: torch.Tensor) -> None:
        """Raise when a config's objective is non-finite or grew without bound (B,)."""
        if self.obj0 is None:
            self.obj0 = obj
        bad = ~torch.isfinite(obj)
        if bool(bad.any()):
            raise self._diverged(step, bad, "non-finite values")
        grown = obj > GROWTH_LIMIT * self.obj0.clamp(min=1.0)  # (B,)
        if bool(grown.any()):
            i = int(grown.nonzero()[0])
            reason = f"objective grew from {float(self.obj0[i]):.3g} to {float(obj[i]):.3g}"
            raise self._diverged(step, grown, reason)

    def log(self, step: int) -> None:
        """Record the rows of ``step`` (and hand them to the callback)."""
        p, H = self.p, self.full_h()
        obj = self._objective(H)  # (B,)
        gW, gH = gradients(self.W, H, self.anchor, self.Y, self.lam_t, float(p.lam_w), p.loss)
        gnorm = (gW.square().sum(dim=(-2, -1)) + gH.square().sum(dim=(-2, -1))).sqrt()  # (B,)
        bad = ~(torch.isfinite(obj) & torch.isfinite(gnorm))
        if bool(bad.any()):
            raise self._diverged(step, bad, "non-finite values")
        self._check_growth(step, obj)
        align = alignment(H, self.X)  # (B,)
        obj_l, gnorm_l, align_l = obj.tolist(), gnorm.tolist(), align.tolist()
        new: list[tuple] = []
        if p.log_data and step in (0, p.steps):
            for metric, v in zip(PFC_METRICS, self.data_pfc, strict=True):
                new.append((DATA_MODEL, math.nan, math.nan, step, metric, v, None))
        for b, (m, s, lam) in enumerate(self.configs):
            vals = (*_pfc(H[b], self.lab, p.num_classes), align_l[b], obj_l[b], gnorm_l[b])
            for metric, v in zip(SURROGATE_METRICS, vals, strict=True):
                new.append((m, lam, float(p.lam_w), step, metric, v, s))
        self.rows.extend(new)
        if self.callback is not None:
            self.callback(step, _to_frame(new, p.seed_column))

    def check(self, step: int) -> None:
        """The periodic check between logged steps: finite W, bounded objective."""
        if not bool(torch.isfinite(self.W).all()):
            bad = ~torch.isfinite(self.W).flatten(1).all(dim=1)  # (B,)
            raise self._diverged(step, bad, "non-finite values")
        self._check_growth(step, self._objective(self.full_h()))

    def step(self) -> None:
        """One GD step of every configuration (both blocks from the same iterate)."""
        W, Hs = self.W, self.Hs
        if self.p.loss == "mse":
            R = torch.baddbmm(self.negYs, W, Hs)  # (B, K, N|D) = W H - Y
        else:
            R = torch.softmax(torch.bmm(W, Hs), dim=1).add_(self.negYs)  # (B, K, N)
        W_next = torch.baddbmm(W, R, Hs.mT, beta=self.beta_w, alpha=self.alpha_w)  # (B, K, d)
        r = None if self.guard is None else self.guard.ratio(W)  # (B, 1, 1) or None (inactive)
        if r is None:
            Hs = torch.baddbmm(
                torch.addcmul(self.c_anchor, Hs, self.keep_h), W.mT, R, alpha=self.alpha_h
            )
        else:  # the same step with lr_h scaled by r in (0, 1] per config
            cr = self.c * r  # (B, 1, 1)
            Hs = torch.addcmul(cr * self.anchor_s, Hs, 1.0 - cr)
            Hs = torch.baddbmm(Hs, (r * W).mT, R, alpha=self.alpha_h)
        self.W, self.Hs = W_next, Hs

    def run(self) -> SurrogateResult:
        steps = self.p.steps
        every = steps if self.p.log_every is None else self.p.log_every
        self.log(0)
        with tqdm(total=steps, disable=not sys.stderr.isatty(), desc="surrogate GD") as bar:
            step = 0
            while step < steps:
                # run to the next log step or divergence check, whichever comes first
                chunk = min(every - step % every, _CHECK_EVERY - step % _CHECK_EVERY, steps - step)
                for _ in range(chunk):
                    self.step()
                step += chunk
                bar.update(chunk)
                if step % every == 0 or step == steps:
                    self.log(step)
                else:
                    self.check(step)
        B = len(self.configs)
        guarded = [0] * B if self.guard is None else self.guard.active_steps.tolist()
        table = _to_frame(self.rows, self.p.seed_column)
        return SurrogateResult(table, self.W, self.full_h(), self.configs, steps, guarded)


class _HStepGuard:
    """Per-config step-size cap of the H step (see the module docstring, "Step-size guard").

    ``ratio(W)`` returns r (B, 1, 1) with r_b = min(1, c / (s (curv ||W_b||_2^2 + lam_b))),
    s = lr_h / N the per-sample step, curv = 1 (MSE) or 1/2 (CE), c = H_STEP_GUARD_C, so that
    the H step becomes r_b lr_h; or None when r = 1 for every config. ||W_b||_2^2 (the largest
    eigenvalue of the K x K Gram W_b W_b^T) is only computed when the cheap upper bound
    ||W_b||_2 <= ||W_b||_F does not already prove r = 1 for every config.
    """

    def __init__(self, s: float, lam_b: torch.Tensor, loss: str):
        curv = 1.0 if loss == "mse" else 0.5
        self.a = H_STEP_GUARD_C / (s * curv)  # r_b = min(1, a / (||W_b||_2^2 + lam_b / curv))
        self.lam_c = lam_b / curv  # (B, 1, 1)
        # r_b = 1 for every b while max_b ||W_b||_2^2 <= a - max_b lam_b / curv
        self.bound = math.sqrt(max(self.a - float(self.lam_c.max()), 0.0))
        self.active_steps = torch.zeros(lam_b.shape[0], dtype=torch.long, device=lam_b.device)

    def ratio(self, W: torch.Tensor) -> torch.Tensor | None:
        fro = torch.linalg.vector_norm(W, dim=(1, 2))  # (B,) ||W_b||_F
        top = fro.max().item()
        if not top > self.bound or not math.isfinite(top):
            # r = 1 for every config; or a non-finite W (a diverged W step): left to the
            # divergence check
            return None
        # ||W_b||_2^2 = ||W_b||_F^2 lambda_max(V_b V_b^T), V_b = W_b / ||W_b||_F: the Gram's
        # entries are in [-1, 1] whatever the scale of W (no overflow inside eigvalsh)
        scale = fro.clamp(min=torch.finfo(W.dtype).tiny).reshape(-1, 1, 1)  # (B, 1, 1)
        V = W / scale  # (B, K, d)
        lmax = torch.linalg.eigvalsh(torch.bmm(V, V.mT))[:, -1] * fro.square()  # (B,)
        r = torch.div(self.a, lmax.reshape(-1, 1, 1) + self.lam_c).clamp_(max=1.0)  # (B, 1, 1)
        self.active_steps += (r < 1.0).flatten()
        return r


def _to_frame(rows: list[tuple], seed_column: bool) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[*TABLE_COLUMNS, "seed"])
    df = df.astype({"model": str, "lam": "float64", "lam_w": "float64", "epoch": "int64"})
    df = df.astype({"metric": str, "value": "float64"})
    if seed_column:
        df["seed"] = df["seed"].astype("Int64")
        return df
    return df.drop(columns="seed")


def solve_grid(
    model: str | Sequence[str],
    X: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lams: float | Sequence[float],
    lam_w: float = 0.005,
    *,
    seed: int | Sequence[int] = 0,
    callback: Callable[[int, pd.DataFrame], None] | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Entry point of the task layer: solve ``model`` for every lam in ``lams`` in one batch.

    Returns the tidy long table with columns [model, lam, lam_w, epoch, metric, value]
    (epoch = GD step; model in {data, mufm, ufm}), plus an Int64 ``seed`` column when ``seed``
    is a sequence. ``options``: the fields of :class:`SurrogateProblem` (loss, lr, steps,
    log_every, h_step, h_step_guard, device, dtype, ...); see :func:`solve_batched`.
    """
    result = solve_batched(
        X, labels, num_classes, lams, lam_w, models=model, seeds=seed, callback=callback, **options
    )
    return result.table
