"""Metric functions vs brute force (every matrix built in float64 numpy) and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference import class_means, layer_metrics, ncc_predict

from pfc_sweeps.collapse import geodesic as G
from pfc_sweeps.collapse import inputs
from pfc_sweeps.collapse import metrics as oneshot
from pfc_sweeps.collapse import stats as M
from pfc_sweeps.collapse.inputs import DegenerateFeaturesError, EmptyClassError, MetricInputError
from pfc_sweeps.collapse.metrics import (
    effective_depth,
    energy_ratio,
    geodesic_curve,
    nc3,
    nc4,
    pfc_metrics,
    relative_positions,
    straightness,
    thm1_inner,
    transport_cost,
)
from pfc_sweeps.results.schema import (
    NC1,
    NC2_EQUIANGLE,
    NC2_EQUINORM,
    PFC1,
    PFC2,
    PFC3,
)

RTOL = 1e-8


def make_data(seed, n=300, d=12, k=4, sep=1.5, offset=3.0, unbalanced=True, dtype=torch.float64):
    gen = np.random.default_rng(seed)
    if unbalanced:
        p = gen.dirichlet(np.ones(k)) * 0.6 + 0.4 / k
        y = np.concatenate([np.arange(k), gen.choice(k, size=n - k, p=p)])
    else:
        y = np.repeat(np.arange(k), n // k)
    gen.shuffle(y)
    mu = gen.normal(size=(k, d)) * sep + offset
    h = mu[y] + gen.normal(size=(len(y), d)) * gen.uniform(0.5, 2.0, size=d)
    return torch.tensor(h, dtype=dtype), torch.tensor(y, dtype=torch.int64)


def assert_close(got: dict, want: dict, keys=None, rtol=RTOL, atol=1e-12):
    for key in keys or got:
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=atol), key


# ------------------------------------------------------------------------------------------
# pfc_metrics vs brute force
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seed", "n", "d", "k", "unbalanced"),
    [(0, 300, 12, 4, True), (1, 257, 40, 10, True), (2, 200, 3, 10, True), (3, 120, 7, 3, False)],
)
def test_pfc_metrics_matches_brute_force(seed, n, d, k, unbalanced):
    h, y = make_data(seed, n=n, d=d, k=k, unbalanced=unbalanced)
    got = pfc_metrics(h, y, k)
    assert set(got) == {PFC1, PFC2, PFC3, NC1, NC2_EQUINORM, NC2_EQUIANGLE}
    assert_close(got, layer_metrics(h.numpy(), y.numpy(), k))
    assert all(isinstance(v, float) for v in got.values())


def test_pfc_metrics_float32_input_and_chunking(monkeypatch):
    h, y = make_data(5, n=400, d=16, k=5, dtype=torch.float32)
    want = layer_metrics(h.double().numpy(), y.numpy(), 5)
    monkeypatch.setattr(inputs, "_CHUNK_ELEMENTS", 16 * 7)  # 7 rows per chunk
    assert_close(pfc_metrics(h, y, 5), want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_pfc_metrics_accepts_any_integer_labels(dtype):
    h, y = make_data(23, n=90, d=4, k=3)
    want = pfc_metrics(h, y, 3)
    assert_close(pfc_metrics(h, y.to(dtype), 3), want, rtol=1e-14)
    curve = geodesic_curve(h, h * 2 + 1, y.to(dtype), 3, [0.0, 1.0])
    assert float(curve[PFC1][0]) == pytest.approx(want[PFC1], rel=1e-12)


def test_pfc_metrics_d_smaller_than_k_minus_1_nc1_uses_pinv():
    h, y = make_data(6, n=150, d=2, k=6)
    assert_close(pfc_metrics(h, y, 6), layer_metrics(h.numpy(), y.numpy(), 6))


# ------------------------------------------------------------------------------------------
# invariants
# ------------------------------------------------------------------------------------------
def random_rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return torch.tensor(q * np.sign(np.diag(r)), dtype=torch.float64)


def test_pfc1_invariant_to_translation_rotation_scale():
    h, y = make_data(7, n=240, d=9, k=5)
    base = pfc_metrics(h, y, 5)
    shift = torch.tensor(np.random.default_rng(1).normal(size=9) * 50.0)
    moved = (h @ random_rotation(9, 2)) * 3.7 + shift
    out = pfc_metrics(moved, y, 5)
    # PFC2/PFC3/NC are invariant too; PFC1 is the one the issue pins down
    assert_close(out, base, rtol=1e-9)
    assert pfc_metrics(h * 0.01, y, 5)[PFC1] == pytest.approx(base[PFC1], rel=1e-10)


def simplex_means(k, d, seed, scale):
    """Exact simplex ETF in R^d: rows of (I - 11^T/K) embedded and rotated (d >= K-1)."""
    etf = np.eye(k) - 1.0 / k  # (K, K), rank K-1, rows lie in 1^perp
    u, _, _ = np.linalg.svd(etf)
    coords = etf @ u[:, : k - 1]  # (K, K-1) isometric coordinates of the simplex
    rot = random_rotation(d, seed).numpy()[: k - 1]  # (K-1, d) orthonormal rows
    return scale * coords @ rot + np.random.default_rng(seed).normal(size=d)


@pytest.mark.parametrize(
    ("k", "d", "scale"), [(4, 3, 1.0), (4, 10, 250.0), (10, 9, 0.02), (7, 30, 3.0)]
)
def test_pfc2_zero_for_simplex_etf(k, d, scale):
    means = simplex_means(k, d, seed=k + d, scale=scale)
    y = np.concatenate([np.arange(k), np.random.default_rng(0).integers(0, k, size=5 * k)])
    noise = np.random.default_rng(1).normal(size=(len(y), d))
    # zero-mean noise per class keeps the class means exactly on the ETF
    for c in range(k):
        noise[y == c] -= noise[y == c].mean(axis=0)
    h = torch.tensor(means[y] + 0.1 * scale * noise)
    out = pfc_metrics(h, torch.tensor(y), k)
    assert out[PFC2] == pytest.approx(0.0, abs=1e-7)
    assert out[NC2_EQUINORM] == pytest.approx(0.0, abs=1e-7)
    assert out[NC2_EQUIANGLE] == pytest.approx(0.0, abs=1e-7)


def test_pfc2_is_positive_off_the_etf():
    h, y = make_data(8, n=200, d=6, k=4)
    assert pfc_metrics(h, y, 4)[PFC2] > 1e-3


def test_pfc3_one_for_well_separated_clusters():
    h, y = make_data(9, n=300, d=5, k=6, sep=100.0)
    h = h.clone()
    assert pfc_metrics(h, y, 6)[PFC3] == 1.0


def test_pfc1_zero_when_samples_equal_class_means():
    k, d = 5, 8
    means = np.random.default_rng(3).normal(size=(k, d)) + 10.0
    y = np.random.default_rng(4).permutation(np.concatenate([np.arange(k)] * 7 + [[0, 1, 1]]))
    out = pfc_metrics(torch.tensor(means[y]), torch.tensor(y), k)
    assert out[PFC1] == pytest.approx(0.0, abs=1e-14)
    assert out[NC1] == pytest.approx(0.0, abs=1e-12)
    assert out[PFC3] == 1.0


# ------------------------------------------------------------------------------------------
# geodesic curves
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_geodesic_curve_matches_interpolated_features(seed):
    k, d = 5, 10
    h0, y = make_data(seed, n=260, d=d, k=k, sep=0.8)
    gen = np.random.default_rng(seed + 10)
    hl = (
        h0 @ torch.tensor(gen.normal(size=(d, d)) * 0.5)
        + torch.tensor(gen.normal(size=(k, d)) * 3.0)[y]
    )
    ts = torch.tensor([0.0, 0.13, 0.4, 0.5, 0.77, 0.9, 1.0])
    curve = geodesic_curve(h0, hl, y, k, ts)
    assert set(curve) == {PFC1, PFC2, PFC3}
    for j, t in enumerate(ts.tolist()):
        want = layer_metrics(((1 - t) * h0 + t * hl).numpy(), y.numpy(), k)
        for key in (PFC1, PFC2, PFC3):
            assert float(curve[key][j]) == pytest.approx(want[key], rel=RTOL, abs=1e-12), (t, key)
    # endpoints are the layer metrics (same code path: equal to rounding)
    for j, h in ((0, h0), (-1, hl)):
        layer = pfc_metrics(h, y, k)
        for key in (PFC1, PFC2, PFC3):
            assert float(curve[key][j]) == pytest.approx(layer[key], rel=1e-12, abs=1e-15)


def test_geodesic_pfc3_not_monotone_is_still_exact():
    # classes swap places between h0 and hL: the NCC accuracy dips mid-way
    k, d = 3, 4
    h0, y = make_data(11, n=150, d=d, k=k, sep=5.0, offset=0.0)
    hl = -h0 + 0.5
    ts = torch.linspace(0, 1, 11)
    curve = geodesic_curve(h0, hl, y, k, ts)
    for j, t in enumerate(ts.tolist()):
        if abs(t - 0.5) < 1e-12:
            continue  # (1-t) h0 + t hL is constant at t=0.5: degenerate
        want = layer_metrics(((1 - t) * h0 + t * hl).numpy(), y.numpy(), k)[PFC3]
        assert float(curve[PFC3][j]) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("high", [2, 5, 1000])
def test_ncc_correct_from_scores_matches_argmin_with_ties(high):
    gen = torch.Generator().manual_seed(high)
    k, t, b = 6, 7, 300
    scores = torch.randint(0, high, (k, t, b), generator=gen).double()  # many exact ties
    labels = torch.randint(0, k, (b,), generator=gen)
    want = (scores.argmin(dim=0) == labels).sum(dim=1)  # argmin: lowest index wins ties
    assert torch.equal(M.ncc_correct_from_scores(scores, labels), want)


def test_geodesic_pruning_of_decided_samples_is_exact(monkeypatch):
    # mixed data: some samples right at every t, some wrong at every t, some switching
    k, d = 4, 6
    h0, y = make_data(24, n=400, d=d, k=k, sep=1.2)
    gen = np.random.default_rng(25)
    hl = h0 @ torch.tensor(gen.normal(size=(d, d))) + torch.tensor(gen.normal(size=(k, d)) * 2)[y]
    ts = torch.linspace(0, 1, 21)
    g0, ht0, gram0 = M.class_moments(*oneshot._layer_pass1(h0, y, k))[1:]
    gl, htl, graml = M.class_moments(*oneshot._layer_pass1(hl, y, k))[1:]
    x01 = ht0 @ htl.T
    coef = G.geodesic_coefficients(ts)
    smat = G.geodesic_score_matrix(
        coef, torch.diagonal(G.geodesic_gram(coef, gram0, x01, graml), dim1=1, dim2=2)
    )
    bern = G.geodesic_bernstein_diag(gram0, x01, graml)
    u, v = h0 - g0, hl - gl
    p0, pl, cross = u @ ht0.T, v @ htl.T, u @ htl.T + v @ ht0.T
    right, wrong = G._geodesic_decided(bern, torch.stack([p0.T, cross.T, pl.T], 1), y)
    assert right.any() and wrong.any() and (~(right | wrong)).any()
    pruned = G.geodesic_ncc_correct(smat, bern, p0, cross, pl, y)
    none = (torch.zeros_like(right), torch.zeros_like(right))
    monkeypatch.setattr(G, "_geodesic_decided", lambda *a: none)
    assert torch.equal(G.geodesic_ncc_correct(smat, bern, p0, cross, pl, y), pruned)
    # the masked (accelerator) variant of the scorer counts only the masked samples
    scores = torch.bmm(
        smat,
        torch.cat(
            [torch.stack([p0.T, cross.T, pl.T], 1), torch.ones(k, 1, 400, dtype=torch.float64)], 1
        ),
    )
    keep = ~(right | wrong)
    want = M.ncc_correct_from_scores(scores.clone()[:, :, keep], y[keep])
    assert torch.equal(M.ncc_correct_from_scores(scores, y, keep), want)
    # and all of it equals brute force on the interpolated features
    for j, t in enumerate(ts.tolist()):
        acc = layer_metrics(((1 - t) * h0 + t * hl).numpy(), y.numpy(), k)[PFC3]
        assert int(pruned[j]) == round(acc * 400)


def test_geodesic_degenerate_midpoint_raises():
    h0, y = make_data(12, n=60, d=3, k=3)
    with pytest.raises(DegenerateFeaturesError, match="geodesic"):
        geodesic_curve(h0, -h0, y, 3, [0.0, 0.5, 1.0])


# ------------------------------------------------------------------------------------------
# path metrics, NC3/NC4, Theorem quantities
# ------------------------------------------------------------------------------------------
def make_path(seed, n=80, d=6, layers=5):
    gen = np.random.default_rng(seed)
    h = [gen.normal(size=(n, d))]
    for _ in range(layers - 1):
        h.append(h[-1] + gen.normal(size=(n, d)) * gen.uniform(0.2, 2.0))
    return [torch.tensor(x) for x in h]


def test_relative_positions_straightness_energy_vs_loops():
    hs = make_path(0)
    n = hs[0].shape[0]
    steps = [
        sum(np.linalg.norm((hs[j + 1] - hs[j]).numpy()[i]) for i in range(n)) for j in range(4)
    ]
    r = np.concatenate([[0.0], np.cumsum(steps)]) / sum(steps)
    got = relative_positions(hs)
    assert got.dtype == torch.float64 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), r, rtol=RTOL)
    assert float(got[0]) == 0.0 and float(got[-1]) == 1.0
    disp = [np.linalg.norm((hs[-1] - hs[0]).numpy()[i]) for i in range(n)]
    assert straightness(hs) == pytest.approx(sum(disp) / sum(steps), rel=RTOL)
    sq = sum(float(((hs[j + 1] - hs[j]) ** 2).sum()) for j in range(4))
    assert energy_ratio(hs) == pytest.approx(
        4 * sq / float(((hs[-1] - hs[0]) ** 2).sum()), rel=RTOL
    )
    assert 0 < straightness(hs) < 1 and energy_ratio(hs) > 1


def test_equal_straight_steps_give_one():
    h0, hl = make_path(1, layers=2)
    hs = [h0 + (j / 4) * (hl - h0) for j in range(5)]
    np.testing.assert_allclose(relative_positions(hs).numpy(), np.linspace(0, 1, 5), atol=1e-14)
    assert straightness(hs) == pytest.approx(1.0, rel=1e-12)
    assert energy_ratio(hs) == pytest.approx(1.0, rel=1e-12)


def test_thm1_inner_and_transport_cost_vs_brute():
    h0, y = make_data(13, n=200, d=7, k=4)
    hl, _ = make_data(14, n=200, d=7, k=4)
    m0, g0 = class_means(h0.numpy(), y.numpy(), 4)
    ml, gl = class_means(hl.numpy(), y.numpy(), 4)
    t0, tl = (m0 - g0).T, (ml - gl).T  # (d, K)
    assert thm1_inner(h0, hl, y, 4) == pytest.approx(np.trace(t0.T @ tl), rel=RTOL)
    assert transport_cost(h0, hl, y, 4) == pytest.approx(np.linalg.norm(tl - t0) ** 2, rel=RTOL)


def test_nc3_nc4_vs_brute():
    k, d = 4, 9
    h, y = make_data(15, n=300, d=d, k=k, sep=0.7)
    gen = np.random.default_rng(16)
    w = torch.tensor(gen.normal(size=(k, d)))
    b = torch.tensor(gen.normal(size=k))
    means, g = class_means(h.numpy(), y.numpy(), k)
    htilde = (means - g).T
    want3 = (
        np.linalg.norm(w.numpy().T / np.linalg.norm(w.numpy()) - htilde / np.linalg.norm(htilde))
        ** 2
    )
    assert nc3(w, h, y, k) == pytest.approx(want3, rel=RTOL)
    clf = (h.numpy() @ w.numpy().T + b.numpy()).argmax(axis=1)
    want4 = float((clf != ncc_predict(h.numpy(), y.numpy(), k)).mean())
    assert 0 < want4 < 1
    assert nc4(w, b, h, y, k) == pytest.approx(want4, abs=1e-15)
    clf0 = (h.numpy() @ w.numpy().T).argmax(axis=1)
    assert nc4(w, None, h, y, k) == pytest.approx(
        float((clf0 != ncc_predict(h.numpy(), y.numpy(), k)).mean()), abs=1e-15
    )


def test_nc3_zero_when_classifier_is_self_dual():
    h, y = make_data(17, n=100, d=5, k=3)
    means, g = class_means(h.numpy(), y.numpy(), 3)
    w = torch.tensor(means - g) * 7.0
    assert nc3(w, h, y, 3) == pytest.approx(0.0, abs=1e-14)


def test_effective_depth():
    assert effective_depth([0.5, 0.2, 0.01, 0.0, 0.02]) == 2
    assert effective_depth(torch.tensor([0.5, 0.2, 0.011]), epsilon=0.01) == -1
    assert effective_depth([0.3, 0.2], epsilon=0.25) == 1
    with pytest.raises(MetricInputError, match="epsilon"):
        effective_depth([0.1], epsilon=-1)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_error_empty_class():
    h, y = make_data(18, n=50, d=3, k=3)
    y = torch.where(y == 1, 0, y)
    with pytest.raises(EmptyClassError, match=r"\[1\]"):
        pfc_metrics(h, y, 3)


@pytest.mark.parametrize("bad", [-1, 3])
def test_error_labels_out_of_range(bad):
    h, y = make_data(19, n=50, d=3, k=3)
    y = y.clone()
    y[7] = bad
    with pytest.raises(MetricInputError, match=r"out of range.*0\.\.2"):
        pfc_metrics(h, y, 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_error_nonfinite_features(value):
    h, y = make_data(20, n=50, d=3, k=3)
    h = h.clone()
    h[3, 1] = value
    with pytest.raises(MetricInputError, match="NaN or inf"):
        pfc_metrics(h, y, 3)
    with pytest.raises(MetricInputError, match="NaN or inf"):
        geodesic_curve(h, h + 1, y, 3, [0.0, 1.0])


def test_error_bad_shapes_and_types():
    h, y = make_data(21, n=50, d=3, k=3)
    with pytest.raises(MetricInputError, match="num_classes"):
        pfc_metrics(h, y, 1)
    with pytest.raises(MetricInputError, match=r"shape \(N, d\)"):
        pfc_metrics(h[:, 0], y, 3)
    with pytest.raises(MetricInputError, match="integer"):
        pfc_metrics(h, y.double(), 3)
    with pytest.raises(MetricInputError, match=r"shape \(50,\)"):
        pfc_metrics(h, y[:-1], 3)
    with pytest.raises(MetricInputError, match="same shape"):
        geodesic_curve(h, h[:, :2], y, 3, [0.0])
    with pytest.raises(MetricInputError, match="same shape"):
        relative_positions([h, h[:, :2]])
    with pytest.raises(MetricInputError, match="at least 2 layers"):
        straightness([h])


def test_error_degenerate_means():
    h = torch.ones(6, 3, dtype=torch.float64)
    with pytest.raises(DegenerateFeaturesError, match="Tr"):
        pfc_metrics(h, torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    with pytest.raises(DegenerateFeaturesError, match="length 0"):
        relative_positions([h, h.clone()])


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_gpu_match_cpu():
    h0, y = make_data(22, n=500, d=20, k=5, dtype=torch.float32)
    hl = h0 * 2 + 1
    want = pfc_metrics(h0, y, 5)
    got = pfc_metrics(h0.cuda(), y.cuda(), 5)
    assert_close(got, want, rtol=1e-10)
    ts = torch.linspace(0, 1, 6)
    c_cpu = geodesic_curve(h0, hl, y, 5, ts)
    c_gpu = geodesic_curve(h0.cuda(), hl.cuda(), y.cuda(), 5, ts)
    for key in c_cpu:
        torch.testing.assert_close(c_gpu[key], c_cpu[key], rtol=1e-10, atol=1e-12)
    rp = relative_positions([h0.cuda(), hl.cuda()])
    assert rp.tolist() == [0.0, 1.0]


def test_geodesic_frobenius_route_equals_the_matrices(monkeypatch):
    """At many classes the curve's PFC2(t) comes from 3 x 3 Frobenius products instead of
    the (T, K, K) G(t): both give the same curve (stats.FROBENIUS_MIN_K)."""
    gen = torch.Generator().manual_seed(7)
    y = torch.arange(120) % 6
    h0 = torch.randn(6, 5, generator=gen, dtype=torch.float64)[y] + torch.randn(
        120, 5, generator=gen, dtype=torch.float64
    )
    hl = h0 + torch.randn(6, 5, generator=gen, dtype=torch.float64)[y]
    ts = torch.linspace(0, 1, 11)
    matrices = oneshot.geodesic_curve(h0, hl, y, 6, ts)
    monkeypatch.setattr(G, "FROBENIUS_MIN_K", 2)
    frobenius = oneshot.geodesic_curve(h0, hl, y, 6, ts)
    for key, value in matrices.items():
        torch.testing.assert_close(frobenius[key], value, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_pfc2_frobenius_route_equals_the_matrix(monkeypatch, spread):
    """From FROBENIUS_MIN_K classes on, PFC2 = sqrt(2 - 2 <G, E>/||G||) instead of the matrix
    ||G/||G|| - E||: both agree to 1e-9 relative, near an ETF (PFC2 ~ 1e-3) too."""
    import pfc_sweeps.collapse.stats as S

    k, gen = 7, torch.Generator().manual_seed(11)
    etf = torch.eye(k, dtype=torch.float64) - 1.0 / k  # rows: a simplex ETF's vertices
    ht = etf + spread * torch.randn(k, k, generator=gen, dtype=torch.float64)
    ht -= ht.mean(0)
    gram = (ht @ ht.T)[None]  # (1, K, K)
    matrix = S.pfc2_from_gram(gram)
    monkeypatch.setattr(S, "FROBENIUS_MIN_K", 2)
    frobenius = S.pfc2_from_gram(gram)
    assert float(matrix) > (1e-4 if spread < 1 else 0.1)
    torch.testing.assert_close(frobenius, matrix, rtol=1e-9, atol=0)
