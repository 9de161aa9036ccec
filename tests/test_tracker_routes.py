"""Many classes (issue 18): NC1's two exact routes (d x d scatter where d < K, K x K where
K <= d) against a vectorized float64 numpy oracle over all samples, with and without the
feature cache, with single-sample classes and classes absent from most batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.reference import layer_metrics

from pfc_sweeps.collapse import kernels, stats
from pfc_sweeps.collapse.kernels import Routes
from pfc_sweeps.collapse.tracker import CollapseTracker
from pfc_sweeps.results.schema import (
    ENERGY_RATIO,
    GEODESIC_ERR_METRICS,
    NC1,
    NC2_EQUIANGLE,
    NC2_EQUINORM,
    NC3,
    NC4,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    STRAIGHTNESS,
    THM1_INNER,
    TR_SB,
    TR_SW,
    TRANSPORT_COST,
)

TS = [0.0, 0.3, 0.7, 1.0]
FAST_RTOL = 1e-5  # docs/precision.md: the float32 path's bound


def make_data(k: int, d: int, n: int, layers: int = 3, seed: int = 0):
    """Classes 0..K-1 each present, classes 0..4 with a single sample (so absent from most
    batches); class structure that grows with depth (every layer one width d)."""
    gen = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), gen.integers(5, k, size=n - k)])
    gen.shuffle(y)
    centres = gen.normal(size=(k, d))
    hs = [centres[y] * 0.5 + gen.normal(size=(n, d))]
    for _ in range(layers - 1):
        mix = gen.normal(size=(d, d)) / math.sqrt(d)
        hs.append(hs[-1] + np.tanh(hs[-1] @ mix) * 0.5 + 0.3 * centres[y])
    w, b = gen.normal(size=(k, d)), gen.normal(size=k)
    return hs, y, w, b


def run(hs, y, k, w, b, dtype, cache_bytes, batch=700):
    tr = CollapseTracker(
        k,
        geodesic_ts=TS,
        cache_bytes=cache_bytes,
        classifier_weight=torch.tensor(w, dtype=dtype),
        classifier_bias=torch.tensor(b, dtype=dtype),
    )
    th = [torch.tensor(h, dtype=dtype) for h in hs]
    ty = torch.tensor(y)
    for _ in range(2):
        for s in range(0, len(y), batch):
            tr.update([h[s : s + batch] for h in th], ty[s : s + batch])
        tr.end_pass()
        if not tr.needs_second_pass:
            break
    return tr.compute()


def check(res, hs, y, k, w, b, rtol):
    tab = {(int(r.layer), r.metric): r.value for r in res.table.itertuples()}
    want = [layer_metrics(h, y, k) for h in hs]
    for layer, wl in enumerate(want):
        for key in (PFC1, PFC2, NC1, NC2_EQUINORM, NC2_EQUIANGLE, TR_SW, TR_SB):
            assert tab[(layer, key)] == pytest.approx(wl[key], rel=rtol), (layer, key)
        assert abs(tab[(layer, PFC3)] - wl[PFC3]) <= (0 if rtol < 1e-6 else 2 / len(y))
    last = layer_metrics(hs[-1], y, k, w, b)
    assert tab[(len(hs) - 1, NC3)] == pytest.approx(last[NC3], rel=rtol)
    assert abs(tab[(len(hs) - 1, NC4)] - last[NC4]) <= (0 if rtol < 1e-6 else 2 / len(y))
    # path: relative positions, straightness, energy ratio, Thm. 1, transport
    steps = [np.linalg.norm(hs[j + 1] - hs[j], axis=1) for j in range(len(hs) - 1)]
    rel = np.concatenate([[0.0], np.cumsum([s.sum() for s in steps])]) / sum(s.sum() for s in steps)
    got_rel = res.table[res.table.layer >= 0].groupby("layer")["rel_pos"].first().to_numpy()
    np.testing.assert_allclose(got_rel, rel, rtol=rtol)
    disp = np.linalg.norm(hs[-1] - hs[0], axis=1)
    assert tab[(-1, STRAIGHTNESS)] == pytest.approx(
        disp.sum() / sum(s.sum() for s in steps), rel=rtol
    )
    energy = (len(hs) - 1) * sum((s**2).sum() for s in steps) / (disp**2).sum()
    assert tab[(-1, ENERGY_RATIO)] == pytest.approx(energy, rel=rtol)
    ht0, htl = want[0]["_ht"], want[-1]["_ht"]
    assert tab[(-1, THM1_INNER)] == pytest.approx((ht0 * htl).sum(), rel=rtol)
    assert tab[(-1, TRANSPORT_COST)] == pytest.approx(((htl - ht0) ** 2).sum(), rel=rtol)
    # geodesic curves and errors: the oracle on the interpolated features
    for t in TS:
        at = layer_metrics((1 - t) * hs[0] + t * hs[-1], y, k)
        rows = res.curves[res.curves.t == t].set_index("metric")["value"]
        for key in (PFC1, PFC2):
            assert rows[key] == pytest.approx(at[key], rel=rtol), (t, key)
        assert abs(rows[PFC3] - at[PFC3]) <= (0 if rtol < 1e-6 else 2 / len(y))
    for layer, r_l in enumerate(rel):
        at = layer_metrics((1 - r_l) * hs[0] + r_l * hs[-1], y, k)
        for key, err in zip(PFC_METRICS[:2], GEODESIC_ERR_METRICS[:2], strict=True):
            want_err = abs(want[layer][key] - at[key])
            assert tab[(layer, err)] == pytest.approx(want_err, rel=1e-6, abs=rtol * at[key])


@pytest.mark.parametrize(
    ("k", "d", "n"),
    [(300, 40, 1500), (20, 64, 600), pytest.param(1000, 64, 2600, marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("cache_bytes", [2**30, 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routes_equal_the_oracle(k, d, n, cache_bytes, dtype):
    """float64: every metric to 1e-9 (counts exactly); float32: within the 1e-5 bound (NCC
    counts within 2 near-tie flips). Routes: d x d scatter at K > d, K x K at K <= d."""
    hs, y, w, b = make_data(k, d, n)
    res = run(hs, y, k, w, b, dtype, cache_bytes)
    check(res, hs, y, k, w, b, 1e-9 if dtype == torch.float64 else FAST_RTOL)
    routes = Routes.of([d] * len(hs), k)
    assert (routes.scatter, routes.gram) == (([0, 1, 2], []) if d < k else ([], [0, 1, 2]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routes_with_blocked_symmetric_products_equal_the_oracle(monkeypatch, dtype):
    """The symmetric products in blocks (the d x d scatters' upper block triangles, mirrored
    once per pass; G, Sigma_B and the scatter correction by sym_gram), forced at these small
    sizes (blocks of 8 rows: d = 40 in 5): every metric as the oracle (1e-9; float32 1e-5)."""
    monkeypatch.setattr(stats, "SYM_GRAM_BLOCK", 8)
    assert len(stats.gram_edges(40)) == 6 and len(stats.gram_edges(300)) > 30
    k, d, n = 300, 40, 1500
    hs, y, w, b = make_data(k, d, n)
    res = run(hs, y, k, w, b, dtype, 0)
    check(res, hs, y, k, w, b, 1e-9 if dtype == torch.float64 else FAST_RTOL)


@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_float32_gram_products_within_bound(monkeypatch, cache_bytes):
    """The accelerators' rule (K x K route products in float32) run on CPU: within 1e-5."""
    monkeypatch.setattr(kernels, "F64_GRAM_PRODUCTS_ON", ())
    hs, y, w, b = make_data(20, 64, 600, seed=1)
    res = run(hs, y, 20, w, b, torch.float32, cache_bytes)
    check(res, hs, y, 20, w, b, FAST_RTOL)


@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_float32_gram_products_above_the_cpu_class_limit(cache_bytes):
    """On CPU, NC1's K x K products are float64 up to F64_GRAM_PRODUCTS_MAX_K classes and
    float32 above (where float64 costs a tenth of the pass): still within 1e-5."""
    cpu, limit = torch.device("cpu"), kernels.F64_GRAM_PRODUCTS_MAX_K
    assert kernels.gram_products_dtype(cpu, limit) == torch.float64
    assert kernels.gram_products_dtype(cpu, limit + 1) == torch.float32
    k = limit + 8
    hs, y, w, b = make_data(k, 64, 900, seed=2)
    res = run(hs, y, k, w, b, torch.float32, cache_bytes)
    check(res, hs, y, k, w, b, FAST_RTOL)


@pytest.mark.parametrize(("k", "d", "n"), [(20, 64, 600), (40, 64, 900), (300, 40, 1500)])
@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_float32_far_from_the_origin_within_bound(k, d, n, cache_bytes):
    """Features offset far from the origin (||m_c|| >> the within-class spread): the float32
    path centres at the float32-rounded class means m' and undoes that rounding once per pass
    (kernels.PassOffsets), so both routes stay within 1e-5 of the float64 oracle."""
    hs, y, w, b = make_data(k, d, n, seed=1)
    onehot = np.eye(k)[y]  # (N, K)
    far = []
    for h in hs:  # collapsed (residuals / 1000) around means 300 away: m' - m ~ 2e-5 ~ r / 50
        means = (onehot.T @ h) / onehot.sum(0)[:, None]
        h = 300.0 + means[y] + 1e-3 * (h - means[y])
        far.append(h.astype(np.float32).astype(np.float64))  # the oracle sees the same data
    hs = far
    res = run(hs, y, k, w, b, torch.float32, cache_bytes)
    check(res, hs, y, k, w, b, FAST_RTOL)


def _held_bytes(obj, skip: set[int], seen: set[int]) -> int:
    """Bytes of the distinct tensor storages reachable from obj (attributes, dataclass fields,
    lists, tuples, dicts), not entering objects whose id is in ``skip``."""
    if id(obj) in skip or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("pfc_sweeps"):
        items = vars(obj).values()
    return sum(_held_bytes(v, skip, seen) for v in items)


@pytest.mark.parametrize("k", [300, 8])
def test_state_bytes_counts_every_tensor_the_tracker_holds(k):
    """state_bytes is at least the bytes of every tensor storage the tracker holds after each
    pass (class means, Grams, kernel tables, accumulators, workspace), the feature cache and
    the caller's classifier excepted."""
    hs, y, w, _ = make_data(k, 40, 1500)
    weight = torch.tensor(w, dtype=torch.float32)
    tr = CollapseTracker(k, geodesic_ts=TS, cache_bytes=0, classifier_weight=weight)
    th, ty = [torch.tensor(h, dtype=torch.float32) for h in hs], torch.tensor(y)
    for _ in range(2):
        tr.update(th, ty)
        tr.end_pass()
        core = tr._run
        caller = {("storage", weight.untyped_storage().data_ptr())}  # the caller's weight
        held = _held_bytes(core, {id(core._cache)}, caller)
        assert tr.state_bytes >= held > 0


def test_state_independent_of_n_at_many_classes():
    """K > d (the d x d route): the tracker's state (two passes, no cache) is the same for N
    and 2N samples."""
    hs, y, _, _ = make_data(300, 40, 1500)
    th, ty = [torch.tensor(h) for h in hs], torch.tensor(y)
    states = []
    for reps in (1, 2):
        tr = CollapseTracker(300, cache_bytes=0)
        for s in range(0, 1500 * reps, 500):
            idx = torch.arange(s, s + 500) % 1500
            tr.update([h[idx] for h in th], ty[idx])
        tr.end_pass()
        states.append(tr.state_bytes)
    assert states[0] == states[1] > 0


@pytest.mark.parametrize("n", [1, 100, 383, 384, 640, 1001])
def test_sym_gram_equals_the_full_product(n):
    """sym_gram (the K x K Gram and Sigma_B at many classes) computes only the upper block
    triangle's GEMMs and mirrors them: every entry equals a @ a.T in numpy's float64."""
    a = np.random.default_rng(n).normal(size=(n, 37))
    got = stats.sym_gram(torch.tensor(a)).numpy()
    np.testing.assert_allclose(got, a @ a.T, rtol=1e-12, atol=1e-12 * np.abs(a).max() ** 2)


def test_nc2_in_row_blocks_equals_numpy(monkeypatch):
    """nc2_from_gram forms the cosines in row blocks (here 3 rows of K = 50: 17 blocks, the
    last one short): equinorm and equiangle as numpy's over the whole K x K matrix."""
    k = 50
    monkeypatch.setattr(stats, "_NC2_BLOCK_ELEMENTS", 3 * k + 7)
    ht = np.random.default_rng(7).normal(size=(k, 20))
    gram = ht @ ht.T
    norms = np.sqrt(np.diag(gram))
    dev = np.abs(gram / np.outer(norms, norms) + 1.0 / (k - 1))
    got = stats.nc2_from_gram(torch.tensor(gram))
    want = (dev.sum() - np.trace(dev)) / (k * (k - 1))
    assert float(got[NC2_EQUIANGLE]) == pytest.approx(want, rel=1e-13)
    assert float(got[NC2_EQUINORM]) == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-13)
    out = torch.full((k, k), math.nan, dtype=torch.float64)  # sym_gram into a given tensor
    monkeypatch.setattr(stats, "SYM_GRAM_BLOCK", 8)
    assert stats.sym_gram(torch.tensor(ht), out=out) is out
    np.testing.assert_allclose(out.numpy(), gram, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("scale", "route"), [(1.0, "cholesky"), (1e-2, "cholesky"), (1e-3, "eigh"), (0.0, "eigh")]
)
def test_nc1_scatter_route_cholesky_and_eigh(monkeypatch, scale, route):
    """nc1_from_scatter (K > d) inverts Sigma_B by Cholesky when it is well conditioned and
    falls back to the eigendecomposition (pinv's cutoff) when it is ill conditioned (cond
    ~5e6) or singular: both equal the float64 reference to 1e-9. At scale 1e-2 (cond ~5e4)
    the bound on cond that picks the route must be the Frobenius one: Tr Sigma_B Tr Sigma_B^-1
    is above the threshold there, ||Sigma_B||_F ||Sigma_B^-1||_F is below."""
    k, d, n = 60, 20, 900
    gen = np.random.default_rng(4)
    y = np.concatenate([np.arange(k), gen.integers(0, k, size=n - k)])
    mu = gen.normal(size=(k, d)) * np.r_[np.ones(d // 2), np.full(d - d // 2, scale)]
    onehot = np.eye(k)[y]
    noise = 0.3 * gen.normal(size=(n, d))
    res = noise - ((onehot.T @ noise) / onehot.sum(0)[:, None])[y]  # sums to 0 in each class
    h, means = mu[y] + res, mu  # the class means are mu: Sigma_B as scaled
    if scale == 1e-2:
        sb = (means - means.mean(0)).T @ (means - means.mean(0)) / k
        inv = np.linalg.inv(sb)
        assert np.trace(sb) * np.trace(inv) > stats._CHOL_MAX_COND
        assert np.linalg.norm(sb) * np.linalg.norm(inv) < stats._CHOL_MAX_COND
    calls = []
    monkeypatch.setattr(
        stats.torch.linalg, "eigh", lambda a, _e=torch.linalg.eigh: calls.append(1) or _e(a)
    )
    got = stats.nc1_from_scatter(n, torch.tensor(means - means.mean(0)), torch.tensor(res.T @ res))
    assert float(got) == pytest.approx(layer_metrics(h, y, k)[NC1], rel=1e-9)
    assert bool(calls) == (route == "eigh")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_run_tracker_with_both_routes(dtype):
    """A LayerRunTracker over layers of different widths (8 < K = 12 <= 30: the d x d route,
    then the K x K route) gives every layer's PFC1-3 and NC1 of the float64 reference."""
    from pfc_sweeps.collapse.core import LayerRunTracker

    k, n = 12, 480
    gen = np.random.default_rng(5)
    y = np.concatenate([np.arange(k), gen.integers(0, k, size=n - k)])
    hs = [gen.normal(size=(k, d))[y] + 0.7 * gen.normal(size=(n, d)) for d in (8, 30)]
    tr = LayerRunTracker(k, cache_bytes=0)
    for _ in range(2):
        for s in range(0, n, 100):
            tr.update(
                [torch.tensor(h[s : s + 100], dtype=dtype) for h in hs],
                torch.tensor(y[s : s + 100]),
            )
        tr.end_pass()
    tab = tr.compute().table.set_index(["layer", "metric"])["value"]
    rtol = 1e-9 if dtype == torch.float64 else FAST_RTOL
    for layer, h in enumerate(hs):
        want = layer_metrics(
            h.astype(np.float32).astype(np.float64) if dtype == torch.float32 else h, y, k
        )
        for key in (PFC1, PFC2, PFC3, NC1):
            assert tab[(layer, key)] == pytest.approx(want[key], rel=rtol), (layer, key)
