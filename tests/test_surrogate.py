"""MUFM/UFM solver (pfc_sweeps/surrogate/) vs closed forms, autograd and brute force.

the paper's MUFM / UFM (eq. 13, eq. 2). Every check compares against an independent computation: the
closed form W*(H) (Theorem 4), torch.autograd, hand-written GD steps, per-lam solves,
and PFC metrics computed here by brute force.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.reference import layer_metrics

from pfc_sweeps.results.schema import (
    ALIGNMENT,
    GRAD_NORM,
    OBJECTIVE,
    PFC1,
    PFC2,
    PFC3,
    SURROGATE_METRICS,
)
from pfc_sweeps.surrogate.objective import (
    H_STEP_GUARD_C,
    SurrogateDivergedError,
    alignment,
    closed_form_w,
    gradients,
    make_gaussian_data,
    objective,
    one_hot_targets,
)
from pfc_sweeps.surrogate.solver import solve_batched, solve_grid

F64 = torch.float64


def tiny(K=3, d=4, n=5, seed=1):
    X, labels = make_gaussian_data(K, d, n, seed)
    return X, labels, one_hot_targets(labels, K)


def final(table: pd.DataFrame, model: str, metric: str, lam: float | None = None) -> float:
    t = table[(table.model == model) & (table.metric == metric)]
    t = t[t.epoch == t.epoch.max()]
    if lam is not None:
        t = t[np.isclose(t.lam, lam)]
    assert len(t) == 1
    return float(t.value.iloc[0])


# ------------------------------------------------------------------------------------------
# data


def test_gaussian_data_layout_and_distribution():
    X, labels = make_gaussian_data(num_classes=4, d=3, n=5000, seed=7)
    assert X.shape == (3, 20000) and X.dtype == F64
    assert torch.equal(labels, torch.arange(4).repeat_interleave(5000))  # Y = I_K (x) 1_n^T
    for k in range(4):
        xk = X[:, labels == k]
        mu = xk.mean(1)
        # mean on the unit sphere (std of ||mean|| ~ sqrt(d/n) = 0.025), covariance I_d
        assert abs(mu.norm().item() - 1.0) < 0.1
        cov = torch.cov(xk)
        assert torch.allclose(cov, torch.eye(3, dtype=F64), atol=0.08)
    X2, _ = make_gaussian_data(num_classes=4, d=3, n=5000, seed=7)
    X3, _ = make_gaussian_data(num_classes=4, d=3, n=5000, seed=8)
    assert torch.equal(X, X2) and not torch.equal(X, X3)


# ------------------------------------------------------------------------------------------
# objective, gradients, closed form


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gradients_match_autograd(loss):
    gen = torch.Generator().manual_seed(0)
    K, d, N = 3, 4, 12
    Y = one_hot_targets(torch.arange(K).repeat_interleave(N // K), K)
    W = torch.randn(3, K, d, generator=gen, dtype=F64, requires_grad=True)
    H = torch.randn(3, d, N, generator=gen, dtype=F64, requires_grad=True)
    X = torch.randn(d, N, generator=gen, dtype=F64)
    anchor = torch.stack([X, torch.zeros_like(X), X])  # mufm, ufm, mufm
    lam = torch.tensor([0.3, 0.7, 0.0], dtype=F64)
    objective(W, H, anchor, Y, lam, 0.2, loss).sum().backward()
    gW, gH = gradients(W.detach(), H.detach(), anchor, Y, lam, 0.2, loss)
    torch.testing.assert_close(gW, W.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gH, H.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_objective_matches_spec_formula(loss):
    """F = L + lam_w/(2K)||W||^2 + lam/(2Kn)||H - X||^2, with L written out sample by sample."""
    X, labels, Y = tiny()
    K, N = Y.shape
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(K, X.shape[0], generator=gen, dtype=F64)
    H = torch.randn(*X.shape, generator=gen, dtype=F64)
    lam, lam_w = 0.3, 0.2
    Z = W @ H
    if loss == "mse":
        fit = sum(((Z[:, i] - Y[:, i]) ** 2).sum() for i in range(N)) / (2 * N)
    else:
        fit = sum(-torch.log_softmax(Z[:, i], 0)[labels[i]] for i in range(N)) / N
    expected = fit + lam_w / (2 * K) * (W**2).sum() + lam / (2 * N) * ((H - X) ** 2).sum()
    got = objective(W[None], H[None], X, Y, lam, lam_w, loss)
    assert got.shape == (1,)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-12)


def test_closed_form_is_the_minimiser_and_equals_theorem_4():
    """W*(H) zeroes dF/dW of the objective, and equals Y H^T (H H^T + n lam_w I)^{-1}."""
    X, _, Y = tiny(K=3, d=6, n=4)
    K, N = Y.shape
    n, lam_w = N // K, 0.05
    H = torch.randn(6, N, generator=torch.Generator().manual_seed(0), dtype=F64)
    Ws = closed_form_w(H, Y, lam_w)
    theorem4 = Y @ H.T @ torch.linalg.inv(H @ H.T + n * lam_w * torch.eye(6, dtype=F64))
    torch.testing.assert_close(Ws, theorem4, rtol=1e-10, atol=1e-12)
    Wv = Ws.clone().requires_grad_(True)
    objective(Wv[None], H[None], X, Y, 0.1, lam_w, "mse").sum().backward()
    assert Wv.grad.abs().max() < 1e-13
    # and it is the minimum (the W-problem is strictly convex): any perturbation costs
    base = objective(Ws[None], H[None], X, Y, 0.1, lam_w, "mse").item()
    for s in range(5):
        dW = 1e-3 * torch.randn(Ws.shape, generator=torch.Generator().manual_seed(s), dtype=F64)
        assert objective((Ws + dW)[None], H[None], X, Y, 0.1, lam_w, "mse").item() > base
    # batched form
    torch.testing.assert_close(closed_form_w(torch.stack([H, 2 * H]), Y, lam_w)[0], Ws)


@pytest.mark.parametrize("method", ["direct", "subspace"])
@pytest.mark.parametrize(("model", "lam", "lam_w"), [("mufm", 0.5, 0.1), ("ufm", 0.05, 0.05)])
def test_gd_converges_to_closed_form(method, model, lam, lam_w):
    """MSE: at the returned (W, H), dF/dW ~ 0 and W = W*(H) (Theorem 4)."""
    X, labels, Y = tiny()
    r = solve_batched(
        X, labels, 3, [lam], lam_w, models=model, steps=6000, log_every=None, method=method
    )
    W, H = r.W[0], r.H[0]
    anchor = X if model == "mufm" else torch.zeros_like(X)
    gW, gH = gradients(W[None], H[None], anchor, Y, lam, lam_w, "mse")
    assert gW.norm() < 1e-9 and gH.norm() < 1e-9
    torch.testing.assert_close(W, closed_form_w(H, Y, lam_w), rtol=0, atol=1e-9)
    assert final(r.table, model, GRAD_NORM) < 1e-9


def test_alignment_formula():
    gen = torch.Generator().manual_seed(0)
    H = torch.randn(2, 4, 9, generator=gen, dtype=F64)
    X = torch.randn(4, 9, generator=gen, dtype=F64)
    for b in range(2):
        expected = np.linalg.norm(
            H[b].numpy() / np.linalg.norm(H[b].numpy()) - X.numpy() / np.linalg.norm(X.numpy())
        )
        assert math.isclose(alignment(H, X)[b].item(), expected, rel_tol=1e-12)
    assert alignment(3 * X[None], X).item() < 1e-15


# ------------------------------------------------------------------------------------------
# the solver's steps


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize(("h_step", "h_scale"), [("per_sample", 15), ("per_class", 5), ("mean", 1)])
def test_first_step_is_the_documented_gd_step(loss, h_step, h_scale):
    """W1 = W0 - lr dF/dW, H1 = H0 - lr * s dF/dH (s = N, n or 1), from W0, H0 ~ N(0,1)."""
    X, labels, Y = tiny()  # K=3, n=5, N=15
    seed, lr, lam, lam_w = 4, 0.01, 0.3, 0.2
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(3, 4, generator=gen, dtype=F64)
    H0 = torch.randn(4, 15, generator=gen, dtype=F64)
    gW, gH = gradients(W0[None], H0[None], X, Y, lam, lam_w, loss)
    r = solve_batched(
        X, labels, 3, [lam], lam_w, loss=loss, lr=lr, steps=1, h_step=h_step, seeds=seed
    )
    torch.testing.assert_close(r.W[0], W0 - lr * gW[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(r.H[0], H0 - lr * h_scale * gH[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("model", ["mufm", "ufm"])
def test_objective_decreases(loss, model):
    X, labels, _ = tiny()
    r = solve_batched(X, labels, 3, [0.01], 0.01, models=model, loss=loss, steps=2000,
                      log_every=100)  # fmt: skip
    obj = r.table[r.table.metric == OBJECTIVE].sort_values("epoch").value.to_numpy()
    assert len(obj) == 21
    assert np.all(np.diff(obj) <= 1e-12 * np.abs(obj[:-1]))
    assert obj[-1] < 0.5 * obj[0]
    gn = r.table[r.table.metric == GRAD_NORM].sort_values("epoch").value.to_numpy()
    assert gn[-1] < 0.1 * gn[0]


def test_subspace_iterates_equal_direct():
    """The MSE fast path (coordinates in span[H0; X; Y]) follows the same iterates."""
    X, labels = make_gaussian_data(5, 20, 100, 2)
    kw = dict(models=["mufm", "ufm"], steps=400, log_every=200, seeds=[0, 2])  # 0: guarded
    a = solve_batched(X, labels, 5, [0.0005, 0.02], method="direct", **kw)
    b = solve_batched(X, labels, 5, [0.0005, 0.02], method="subspace", **kw)
    torch.testing.assert_close(a.W, b.W, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.H, b.H, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.table.value, b.table.value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_batched_equals_looped(loss):
    X, labels = make_gaussian_data(4, 6, 10, 0)
    lams, models, seeds = [0.0, 0.003, 0.05], ["mufm", "ufm"], [0, 5]
    kw = dict(lam_w=0.01, loss=loss, steps=1500, log_every=500)
    batched = solve_batched(X, labels, 4, lams, models=models, seeds=seeds, **kw)
    assert len(batched.configs) == 12
    tables = []
    for i, (m, s, lam) in enumerate(batched.configs):
        one = solve_batched(X, labels, 4, [lam], models=m, seeds=[s], log_data=i == 0, **kw)
        torch.testing.assert_close(batched.W[i], one.W[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(batched.H[i], one.H[0], rtol=0, atol=1e-10)
        tables.append(one.table)
    looped = pd.concat(tables)
    key = ["model", "seed", "lam", "epoch", "metric"]
    a = batched.table.sort_values(key, na_position="first").reset_index(drop=True)
    b = looped.sort_values(key, na_position="first").reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a.value, b.value, rtol=1e-9, atol=1e-12)


def test_same_init_for_every_lam_and_model():
    X, labels = make_gaussian_data(3, 4, 5, 0)
    r = solve_batched(X, labels, 3, [0.0, 0.5], models=["mufm", "ufm"], steps=1, lr=1e-300,
                      seeds=9)  # fmt: skip
    for i in range(1, 4):  # a step of 1e-300 leaves the initial draw in place
        assert torch.equal(r.W[i], r.W[0]) and torch.equal(r.H[i], r.H[0])


# ------------------------------------------------------------------------------------------
# the H step guard (module docstring, "Step-size guard")


def reference_gd(X, labels, K, lam, lam_w, lr, steps, seed, loss, anchor, guard):
    """Plain / guarded GD written out: W -= lr dF/dW, H -= eta N dF/dH, per-sample step
    eta = lr, or min(lr, c / (curv sigma_max(W)^2 + lam)) with sigma_max from an SVD."""
    Y = one_hot_targets(labels, K)
    N = Y.shape[1]
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(K, X.shape[0], generator=gen, dtype=F64)
    H = torch.randn(X.shape[0], N, generator=gen, dtype=F64)
    curv = 1.0 if loss == "mse" else 0.5
    active = 0
    for _ in range(steps):
        gW, gH = gradients(W[None], H[None], anchor, Y, lam, lam_w, loss)
        eta = lr
        if guard:
            sigma2 = torch.linalg.matrix_norm(W, ord=2).item() ** 2
            eta = min(lr, H_STEP_GUARD_C / (curv * sigma2 + lam))
            active += eta < lr
        W, H = W - lr * gW[0], H - eta * N * gH[0]
    return W, H, active


@pytest.mark.parametrize(
    ("loss", "method"), [("mse", "direct"), ("mse", "subspace"), ("ce", "direct")]
)
@pytest.mark.parametrize("model", ["mufm", "ufm"])
def test_guarded_steps_match_hand_written_gd(loss, method, model):
    """Seed 0 in the paper's K, d, lr: ||W_0||_2^2 = 44 puts the first steps beyond the edge."""
    X, labels = make_gaussian_data(5, 20, 20, 0)
    anchor = X if model == "mufm" else torch.zeros_like(X)
    lam, lam_w, steps = 0.001, 0.005, 40
    r = solve_batched(X, labels, 5, [lam], lam_w, models=model, loss=loss, steps=steps,
                      log_every=None, method=method)  # fmt: skip
    W, H, active = reference_gd(X, labels, 5, lam, lam_w, 0.1, steps, 0, loss, anchor, True)
    assert active > 10 and r.guarded_steps == [active]
    torch.testing.assert_close(r.W[0], W, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(r.H[0], H, rtol=1e-9, atol=1e-11)
    # and the plain steps are a different iteration from the first step on
    W1, _, _ = reference_gd(X, labels, 5, lam, lam_w, 0.1, 2, 0, loss, anchor, False)
    r1 = solve_batched(X, labels, 5, [lam], lam_w, models=model, loss=loss, steps=2,
                       log_every=None, method=method)  # fmt: skip
    assert (r1.W[0] - W1).abs().max() > 1e-3


def test_seed0_diverges_without_guard_and_converges_with_it():
    """The default seed 0 in the paper setting: plain GD blows up within the first check
    (SurrogateDivergedError); with the guard the run is finite and the guard acts only in the
    transient, after which the objective decreases monotonically (full run: fig4 acceptance)."""
    X, labels = make_gaussian_data(5, 20, 100, 0)
    kw = dict(models=["mufm", "ufm"], log_every=100, seeds=0)
    with pytest.raises(SurrogateDivergedError) as info:
        solve_batched(X, labels, 5, [0.001], 0.005, steps=3000, h_step_guard=False, **kw)
    assert info.value.step <= 100
    r = solve_batched(X, labels, 5, [0.001], 0.005, steps=3000, **kw)
    assert all(0 < g < 1000 for g in r.guarded_steps), r.guarded_steps
    assert np.isfinite(r.table.value).all()
    for m in ("mufm", "ufm"):
        t = r.table[(r.table.model == m) & (r.table.metric == OBJECTIVE)].sort_values("epoch")
        late = t[t.epoch >= 1000].value.to_numpy()
        assert np.all(np.diff(late) <= 0) and late[-1] < 0.1 * t.value.iloc[0]


@pytest.mark.parametrize(("loss", "method"), [("mse", "direct"), ("mse", "auto"), ("ce", "auto")])
def test_guard_inactive_is_bit_identical(loss, method):
    """lr 0.01: lr (||W||_2^2 + lam) <= 0.01 * 44 < c on every step, the guard never acts,
    and the guarded run is the plain run bit for bit."""
    X, labels = make_gaussian_data(5, 20, 20, 0)
    kw = dict(models=["mufm", "ufm"], loss=loss, lr=0.01, steps=1000, log_every=250,
              seeds=[0, 1], method=method)  # fmt: skip
    a = solve_batched(X, labels, 5, [0.001, 0.02], 0.005, h_step_guard=True, **kw)
    b = solve_batched(X, labels, 5, [0.001, 0.02], 0.005, h_step_guard=False, **kw)
    assert a.guarded_steps == b.guarded_steps == [0] * 8
    assert torch.equal(a.W, b.W) and torch.equal(a.H, b.H)
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)


def test_guard_acts_per_config():
    """In one batch a config whose H step is beyond the edge on every step (lam = 250:
    lr lam = 2.5 > 2) is guarded while the other takes exactly its plain steps."""
    X, labels = make_gaussian_data(5, 20, 20, 0)
    kw = dict(models="mufm", lr=0.01, steps=500, log_every=None, seeds=0)
    mixed = solve_batched(X, labels, 5, [0.001, 250.0], 0.005, **kw)
    assert mixed.guarded_steps[0] == 0 and mixed.guarded_steps[1] > 0
    plain = solve_batched(X, labels, 5, [0.001], 0.005, h_step_guard=False, **kw)
    torch.testing.assert_close(mixed.W[0], plain.W[0], rtol=0, atol=1e-13)
    torch.testing.assert_close(mixed.H[0], plain.H[0], rtol=0, atol=1e-13)
    with pytest.raises(SurrogateDivergedError, match="lam=250"):  # plain GD: unstable H step
        solve_batched(X, labels, 5, [0.001, 250.0], 0.005, h_step_guard=False, **kw)
    # the guarded config still solves its problem: at its fixed point the gradient vanishes
    # (the guard is active on every step: lr lam > c)
    long = solve_batched(X, labels, 5, [250.0], 0.005, **{**kw, "lr": 0.1, "steps": 3000})
    assert long.guarded_steps == [3000]
    gW, gH = gradients(long.W, long.H, X, one_hot_targets(labels, 5), 250.0, 0.005, "mse")
    assert gW.norm() < 1e-10 and gH.norm() < 1e-10


@pytest.mark.parametrize("method", ["direct", "subspace"])
def test_guarded_batched_equals_looped(method):
    X, labels = make_gaussian_data(5, 20, 20, 1)
    kw = dict(lam_w=0.005, steps=300, log_every=150, method=method)
    lams, models, seeds = [0.001, 0.02], ["mufm", "ufm"], [0, 1, 2]
    batched = solve_batched(X, labels, 5, lams, models=models, seeds=seeds, **kw)
    assert all(g > 0 for g in batched.guarded_steps)  # every config starts beyond the edge
    for i, (m, s, lam) in enumerate(batched.configs):
        one = solve_batched(X, labels, 5, [lam], models=m, seeds=[s], **kw)
        assert one.guarded_steps == [batched.guarded_steps[i]]
        torch.testing.assert_close(batched.W[i], one.W[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(batched.H[i], one.H[0], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# the table


def test_table_schema_metrics_and_callback():
    X, labels = make_gaussian_data(3, 4, 6, 0)
    streamed = []
    steps = 250
    r = solve_batched(X, labels, 3, [0.01, 0.1], 0.02, models=["mufm", "ufm"], steps=steps,
                      log_every=100, callback=lambda s, rows: streamed.append((s, rows)))  # fmt: skip
    t = r.table
    assert list(t.columns) == ["model", "lam", "lam_w", "epoch", "metric", "value"]
    assert pd.api.types.is_string_dtype(t.model) and pd.api.types.is_string_dtype(t.metric)
    num = {"lam": np.float64, "lam_w": np.float64, "epoch": np.int64, "value": np.float64}
    assert {c: t[c].dtype for c in num} == num
    assert sorted(t.epoch.unique()) == [0, 100, 200, 250]
    assert [s for s, _ in streamed] == [0, 100, 200, 250]
    pd.testing.assert_frame_equal(pd.concat([rows for _, rows in streamed], ignore_index=True), t)
    data = t[t.model == "data"]
    assert sorted(data.epoch.unique()) == [0, steps]
    assert set(data.metric) == {PFC1, PFC2, PFC3}
    assert data.lam.isna().all() and data.lam_w.isna().all()
    sol = t[t.model != "data"]
    assert len(sol) == 4 * 4 * len(SURROGATE_METRICS)  # 4 configs x 4 logged steps
    assert set(sol.metric) == set(SURROGATE_METRICS) and (sol.lam_w == 0.02).all()
    assert np.isfinite(t.value).all()
    # values against independent computations at the last step
    Y = one_hot_targets(labels, 3)
    for i, (m, _, lam) in enumerate(r.configs):
        ref = layer_metrics(r.H[i].T.numpy(), labels.numpy(), 3)
        for k in (PFC1, PFC2, PFC3):
            assert math.isclose(final(t, m, k, lam), ref[k], rel_tol=1e-9, abs_tol=1e-12)
        anchor = X if m == "mufm" else torch.zeros_like(X)
        Wv, Hv = r.W[i].clone().requires_grad_(), r.H[i].clone().requires_grad_()
        obj = objective(Wv[None], Hv[None], anchor, Y, lam, 0.02, "mse")
        obj.sum().backward()
        gnorm = torch.sqrt(Wv.grad.square().sum() + Hv.grad.square().sum()).item()
        assert math.isclose(final(t, m, OBJECTIVE, lam), obj.item(), rel_tol=1e-12)
        assert math.isclose(final(t, m, GRAD_NORM, lam), gnorm, rel_tol=1e-9)
        assert math.isclose(final(t, m, ALIGNMENT, lam), alignment(r.H[i][None], X).item())
    ref_x = layer_metrics(X.T.numpy(), labels.numpy(), 3)
    for k in (PFC1, PFC2, PFC3):
        assert math.isclose(final(t, "data", k), ref_x[k], rel_tol=1e-9)


def test_solve_grid_table_and_seed_column():
    X, labels = make_gaussian_data(3, 4, 5, 0)
    one = solve_grid("ufm", X, labels, 3, [0.01], steps=10, log_every=None)
    assert "seed" not in one.columns
    many = solve_grid("ufm", X, labels, 3, [0.01], steps=10, log_every=None, seed=[0, 1])
    assert str(many.seed.dtype) == "Int64"
    assert set(many[many.model == "ufm"].seed) == {0, 1}
    assert many[many.model == "data"].seed.isna().all()


def test_thread_setting_is_restored():
    X, labels = make_gaussian_data(3, 4, 5, 0)
    before = torch.get_num_threads()
    solve_batched(X, labels, 3, [0.01], steps=5)
    assert torch.get_num_threads() == before


def test_divergence_raises_instead_of_nan():
    X, labels = make_gaussian_data(3, 4, 5, 0)
    with pytest.raises(SurrogateDivergedError, match=r"lam=0\.01") as info:
        solve_batched(X, labels, 3, [0.01], lr=5.0, steps=1000, log_every=None, h_step_guard=False)
    assert info.value.step <= 100  # caught by the periodic check, not at the end


@pytest.mark.parametrize("method", ["direct", "subspace"])
def test_divergence_with_guard_raises_instead_of_nan(method):
    """The guard bounds the H step only: a W step that overflows (huge data) still diverges,
    and the guard's eigvalsh on a non-finite W must not raise a LinAlgError instead."""
    X, labels = make_gaussian_data(3, 4, 5, 0)
    with pytest.raises(
        SurrogateDivergedError, match=r"mufm seed=0 lam=0\.5: the H step was guarded"
    ) as info:
        solve_batched(X * 1e100, labels, 3, [0.5], steps=300, log_every=None, method=method)
    assert info.value.step <= 100


# ------------------------------------------------------------------------------------------
# input validation


def _ok():
    X, labels = make_gaussian_data(3, 4, 5, 0)
    return dict(X=X, labels=labels, num_classes=3, lams=[0.01])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lams": [0.01, -1.0]}, r"lam=-1\.0 .*>= 0"),
        ({"lams": [float("nan")]}, r"lam=nan"),
        ({"lams": []}, r"lams=\[\]"),
        ({"lam_w": -0.1}, r"lam_w=-0\.1"),
        ({"num_classes": 1}, r"num_classes=1 .*>= 2"),
        ({"num_classes": 6}, r"d=4 .*d >= K-1 = 5"),
        ({"steps": 0}, r"steps=0 .*>= 1"),
        ({"steps": 2.5}, r"steps=2\.5"),
        ({"lr": 0.0}, r"lr=0\.0 .*> 0"),
        ({"log_every": 0}, r"log_every=0"),
        ({"loss": "l1"}, r"loss='l1' .*\['ce', 'mse'\]"),
        ({"models": "nc"}, r"model='nc' .*\['mufm', 'ufm'\]"),
        ({"h_step": "sum"}, r"h_step='sum'"),
        ({"h_step_guard": 1}, r"h_step_guard=1 .*True or False"),
        ({"seeds": -1}, r"seed=-1"),
        ({"method": "fast"}, r"method='fast'"),
        ({"method": "subspace", "loss": "ce"}, r"method='subspace' with loss='ce'"),
        ({"dtype": torch.float16}, r"dtype=torch\.float16"),
        ({"num_threads": 0}, r"num_threads=0"),
    ],
)
def test_invalid_arguments(change, match):
    kw = {**_ok(), "steps": 5, **change}
    X, labels, K, lams = kw.pop("X"), kw.pop("labels"), kw.pop("num_classes"), kw.pop("lams")
    with pytest.raises(ValueError, match=match):
        solve_batched(X, labels, K, lams, **kw)


@pytest.mark.parametrize(
    ("X", "labels", "match"),
    [
        (torch.zeros(4, 15, 1, dtype=F64), torch.zeros(15, dtype=torch.long), r"\(d, N\)"),
        (torch.zeros(4, 15, dtype=torch.long), torch.zeros(15, dtype=torch.long), "floating"),
        (torch.zeros(4, 15, dtype=F64), torch.zeros(14, dtype=torch.long), "N=15"),
        (torch.zeros(4, 15, dtype=F64), torch.arange(15) % 4, r"labels range \[0, 3\]"),
        (torch.zeros(4, 15, dtype=F64), torch.arange(15) % 2, r"classes \[2\] have no samples"),
        (torch.full((4, 15), math.inf, dtype=F64), torch.arange(15) % 3, "NaN or inf"),
        (torch.zeros(4, 15, dtype=F64), torch.zeros(15, dtype=F64), "integer"),
    ],
)
def test_invalid_data(X, labels, match):
    with pytest.raises(ValueError, match=match):
        solve_batched(X, labels, 3, [0.01], steps=5)


def test_make_gaussian_data_validates():
    with pytest.raises(ValueError, match="n=0"):
        make_gaussian_data(3, 4, 0)
    with pytest.raises(ValueError, match="num_classes=1"):
        make_gaussian_data(1, 4, 5)


# ------------------------------------------------------------------------------------------
# acceptance (paper setting, Fig. 4 / Fig. 5), with the default H step guard. Seed 0
# (the default) diverges under plain GD, seed 2 does not (module docstring); seeds 0-9 all pass.

ACCEPT_SEED = 0


@pytest.mark.parametrize("seed", [0, 2])
def test_paper_fig4_acceptance(seed):
    X, labels = make_gaussian_data(5, 20, 100, seed)
    t = solve_grid(["mufm", "ufm"], X, labels, 5, [0.001], 0.005, steps=50_000,
                   log_every=None, seed=seed)  # fmt: skip
    assert t.epoch.max() == 50_000
    data = {k: final(t, "data", k) for k in (PFC1, PFC2, PFC3)}
    mufm = {k: final(t, "mufm", k) for k in (PFC1, PFC2, PFC3)}
    ufm = {k: final(t, "ufm", k) for k in (PFC1, PFC2, PFC3)}
    assert ufm[PFC1] < 1e-2 and ufm[PFC2] < 1e-2 and ufm[PFC3] == 1.0
    for k in (PFC1, PFC2):
        assert ufm[k] < mufm[k] < data[k]
    assert mufm[PFC3] >= data[PFC3]


@pytest.mark.slow
def test_paper_fig5_acceptance():
    X, labels = make_gaussian_data(5, 20, 100, ACCEPT_SEED)
    lams = np.linspace(0.0005, 0.02, 40).tolist()
    t = solve_grid("mufm", X, labels, 5, lams, 0.005, steps=50_000, log_every=None,
                   seed=ACCEPT_SEED)  # fmt: skip
    last = t[(t.model == "mufm") & (t.epoch == 50_000)]
    wide = last.pivot_table(index="lam", columns="metric", values="value").sort_index()
    assert len(wide) == 40
    for metric, sign in ((PFC1, 1), (PFC2, 1), (ALIGNMENT, -1)):
        v = sign * wide[metric].to_numpy()
        # monotone in lam, allowing noise below 1%: no step goes back by 1% or more
        assert np.all(np.diff(v) > -0.01 * np.abs(v[:-1])), metric
        assert v[-1] > v[0], metric


def test_objective_growing_without_bound_is_divergence():
    """lr=100 with the guard: every value stays finite for a while, but the objective explodes.
    The solve must stop as diverged (not end 'done'), naming the start value F(W_0, H_0),
    which is checked here against a float64 numpy brute force of paper eq. 13 (MSE)."""
    K, d, n, lam, lam_w = 5, 20, 100, 0.001, 0.005
    X, labels = make_gaussian_data(K, d, n, 0)
    with pytest.raises(SurrogateDivergedError, match="objective grew") as info:
        solve_batched(X, labels, K, [lam], lam_w=lam_w, lr=100.0, steps=300, log_every=None)
    assert info.value.step <= 300
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(K, d, generator=gen, dtype=torch.float64).numpy()
    H0 = torch.randn(d, K * n, generator=gen, dtype=torch.float64).numpy()
    Y = np.kron(np.eye(K), np.ones((1, n)))
    N = K * n
    f0 = (
        np.sum((W0 @ H0 - Y) ** 2) / (2 * N)
        + lam_w / (2 * K) * np.sum(W0**2)
        + lam / (2 * N) * np.sum((H0 - X.numpy()) ** 2)
    )
    assert f"objective grew from {f0:.3g}" in str(info.value)
