"""CollapseTracker vs brute force (float64 numpy, d x d matrices), streaming and state checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.reference import layer_metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from pfc_sweeps.collapse.inputs import (
    DegenerateFeaturesError,
    EmptyClassError,
    MetricInputError,
    even_sizes,
)
from pfc_sweeps.collapse.tracker import CollapseResult, CollapseTracker, TrackerStateError
from pfc_sweeps.results.schema import (
    EFFECTIVE_DEPTH,
    ENERGY_RATIO,
    GEODESIC_ERR_METRICS,
    LAYER_METRICS,
    NC1,
    NC3,
    NC4,
    PFC1,
    PFC2,
    PFC3,
    PFC_METRICS,
    STRAIGHTNESS,
    THM1_INNER,
    TRANSPORT_COST,
)

RTOL = 1e-8


def make_layers(seed, n=90, d=5, k=4, layers=4, dims=None):
    gen = np.random.default_rng(seed)
    y = np.concatenate(
        [np.arange(k), gen.choice(k, size=n - k, p=gen.dirichlet(np.ones(k)) * 0.5 + 0.5 / k)]
    )
    gen.shuffle(y)
    dims = dims or [d] * layers
    hs = [gen.normal(size=(k, dims[0]))[y] * 0.7 + gen.normal(size=(n, dims[0]))]
    for dl in dims[1:]:
        prev = hs[-1]
        if dl == prev.shape[1]:
            nxt = (
                prev
                + np.maximum(prev @ gen.normal(size=(dl, dl)) * 0.6, 0)
                + gen.normal(size=(k, dl))[y] * 0.5
            )
        else:
            nxt = prev @ gen.normal(size=(prev.shape[1], dl))
        hs.append(nxt)
    return [torch.tensor(h) for h in hs], torch.tensor(y)


def feed(tracker, hs, y, splits, order=None):
    idx = torch.arange(len(y)) if order is None else torch.as_tensor(order)
    bounds = [0, *sorted(splits), len(y)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            sel = idx[a:b]
            tracker.update([h[sel] for h in hs], y[sel])
    tracker.end_pass()


def run_tracker(hs, y, k, splits=(), cache_bytes=2**30, order2=None, **kw):
    tr = CollapseTracker(k, cache_bytes=cache_bytes, **kw)
    feed(tr, hs, y, splits)
    if tr.needs_second_pass:
        feed(tr, hs, y, splits, order=order2)
    assert not tr.needs_second_pass
    return tr.compute()


def lookup(table):
    return {(int(r.layer), r.metric): r.value for r in table.itertuples()}


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_tracker_matches_brute_force(cache_bytes):
    k, n_layers = 4, 4
    hs, y = make_layers(0, n=90, d=5, k=k, layers=n_layers)
    gen = np.random.default_rng(1)
    w, b = torch.tensor(gen.normal(size=(k, 5))), torch.tensor(gen.normal(size=k))
    ts = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
    res = run_tracker(
        hs,
        y,
        k,
        splits=(7, 40, 41),
        cache_bytes=cache_bytes,
        geodesic_ts=ts,
        classifier_weight=w,
        classifier_bias=b,
        epsilon=0.2,
    )
    tab = lookup(res.table)
    hn, yn = [h.numpy() for h in hs], y.numpy()
    n, big_l = len(yn), n_layers - 1

    # relative positions by explicit loops
    steps = [sum(np.linalg.norm(hn[j + 1][i] - hn[j][i]) for i in range(n)) for j in range(big_l)]
    r = np.concatenate([[0.0], np.cumsum(steps)]) / sum(steps)
    rel = res.table.groupby("layer")["rel_pos"].first()
    np.testing.assert_allclose(rel.loc[list(range(n_layers))].to_numpy(), r, rtol=RTOL)
    assert rel.loc[0] == 0.0 and rel.loc[big_l] == 1.0
    assert math.isnan(rel.loc[-1])

    bfs = [layer_metrics(h, yn, k) for h in hn]
    for layer, bf in enumerate(bfs):
        for key in LAYER_METRICS:
            assert tab[(layer, key)] == pytest.approx(bf[key], rel=RTOL, abs=1e-13), (layer, key)
        # geodesic prediction error: brute force builds the interpolated features at t = r_l
        at = layer_metrics((1 - r[layer]) * hn[0] + r[layer] * hn[-1], yn, k)
        for key, err in zip(PFC_METRICS, GEODESIC_ERR_METRICS, strict=True):
            want = abs(bf[key] - at[key])
            assert tab[(layer, err)] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert (
        tab[(0, GEODESIC_ERR_METRICS[0])] < 1e-12 and tab[(big_l, GEODESIC_ERR_METRICS[1])] < 1e-12
    )

    # curves
    for t in ts.tolist():
        at = layer_metrics((1 - t) * hn[0] + t * hn[-1], yn, k)
        rows = res.curves[res.curves.t == t].set_index("metric")["value"]
        for key in (PFC1, PFC2, PFC3):
            assert rows[key] == pytest.approx(at[key], rel=RTOL, abs=1e-13), (t, key)

    # last layer: NC3, NC4
    ht = bfs[-1]["_ht"]
    wn = w.numpy()
    nc3 = np.linalg.norm(wn.T / np.linalg.norm(wn) - ht / np.linalg.norm(ht)) ** 2
    assert tab[(big_l, NC3)] == pytest.approx(nc3, rel=RTOL)
    clf = np.array([np.argmax(wn @ hn[-1][i] + b.numpy()) for i in range(n)])
    assert tab[(big_l, NC4)] == pytest.approx(float(np.mean(clf != bfs[-1]["_ncc"])), abs=1e-15)

    # run level
    errs = [1 - bf[PFC3] for bf in bfs]
    hit = [i for i, e in enumerate(errs) if e <= 0.2]
    assert tab[(-1, EFFECTIVE_DEPTH)] == (hit[0] if hit else -1)
    disp = [np.linalg.norm(hn[-1][i] - hn[0][i]) for i in range(n)]
    assert tab[(-1, STRAIGHTNESS)] == pytest.approx(sum(disp) / sum(steps), rel=RTOL)
    sq = sum(np.sum((hn[j + 1] - hn[j]) ** 2) for j in range(big_l))
    assert tab[(-1, ENERGY_RATIO)] == pytest.approx(
        big_l * sq / np.sum((hn[-1] - hn[0]) ** 2), rel=RTOL
    )
    ht0 = bfs[0]["_ht"]
    assert tab[(-1, THM1_INNER)] == pytest.approx(np.trace(ht0.T @ ht), rel=RTOL)
    assert tab[(-1, TRANSPORT_COST)] == pytest.approx(np.linalg.norm(ht - ht0) ** 2, rel=RTOL)


def test_result_schema_and_rows():
    hs, y = make_layers(2, n=40, d=3, k=3, layers=3)
    res = run_tracker(
        hs, y, 3, geodesic_ts=[0.0, 0.5, 1.0], classifier_weight=torch.ones(3, 3).tril()
    )
    assert isinstance(res, CollapseResult)
    assert list(res.table.columns) == ["layer", "rel_pos", "metric", "value"]
    dtypes = res.table.dtypes
    assert [str(dtypes[c]) for c in ("layer", "rel_pos", "value")] == [
        "int64",
        "float64",
        "float64",
    ]
    assert pd.api.types.is_string_dtype(dtypes["metric"])
    per_layer = {*LAYER_METRICS, *GEODESIC_ERR_METRICS}
    for layer in range(3):
        names = set(res.table[res.table.layer == layer].metric)
        assert names == per_layer | ({NC3, NC4} if layer == 2 else set())
    assert set(res.table[res.table.layer == -1].metric) == {
        EFFECTIVE_DEPTH,
        STRAIGHTNESS,
        ENERGY_RATIO,
        THM1_INNER,
        TRANSPORT_COST,
    }
    assert list(res.curves.columns) == ["t", "metric", "value"] and len(res.curves) == 9
    # the curves are their own table (t, metric, value): 3 t x pfc1-3, never table rows
    assert set(res.curves.t) == {0.0, 0.5, 1.0} and set(res.curves.metric) == set(PFC_METRICS)
    assert not res.table.metric.str.startswith("geodesic_pfc").any()
    assert np.isfinite(res.table.value).all()


def test_no_geodesic_no_classifier_and_mixed_dims():
    hs, y = make_layers(3, n=50, k=3, dims=[4, 6, 5])
    res = run_tracker(hs, y, 3)
    tab = lookup(res.table)
    for layer, h in enumerate(hs):
        bf = layer_metrics(h.numpy(), y.numpy(), 3)
        assert tab[(layer, PFC1)] == pytest.approx(bf[PFC1], rel=RTOL)
    # path quantities need one dimension: rel_pos is NaN, run-level path rows absent
    assert res.table[res.table.layer >= 0].rel_pos.isna().all()
    assert set(res.table[res.table.layer == -1].metric) == {EFFECTIVE_DEPTH}
    assert res.curves.empty
    assert not res.table.metric.str.startswith("geodesic").any()


# ------------------------------------------------------------------------------------------
# layers of different widths (issue 19 item 3): one code path with collapse_table
# ------------------------------------------------------------------------------------------
def _oneshot_layer(h, y, k):
    from pfc_sweeps.collapse import metrics as oneshot

    return oneshot.pfc_metrics(h, y, k)


@pytest.mark.parametrize("cache_bytes", [2**30, 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_widths_per_layer_metrics_equal_one_shot(cache_bytes, dtype):
    """Widths (64, 64, 64, 48) + a classifier on the 48-wide layer: every per-layer metric is
    the one-shot function's (float64: 1e-12; float32: the documented 1e-5); the trailing run
    is one layer, so no path rows and rel_pos NaN; NC3/NC4 on the last layer."""
    from pfc_sweeps.collapse import metrics as oneshot

    k = 5
    hs, y = make_layers(40, n=300, k=k, dims=[64, 64, 64, 48])
    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(k, 48, generator=gen, dtype=torch.float64), torch.randn(k, generator=gen)
    res = run_tracker(
        [h.to(dtype) for h in hs],
        y,
        k,
        splits=(50, 170),
        cache_bytes=cache_bytes,
        classifier_weight=w.to(dtype),
        classifier_bias=b.to(dtype),
    )
    tab = lookup(res.table)
    rtol = 1e-12 if dtype == torch.float64 else FAST_RTOL
    for layer, h in enumerate(hs):
        want = _oneshot_layer(h.to(dtype).double(), y, k)
        for key, value in want.items():
            assert tab[(layer, key)] == pytest.approx(value, rel=rtol, abs=1e-13), (layer, key)
    h3 = hs[3].to(dtype).double()
    assert tab[(3, NC3)] == pytest.approx(oneshot.nc3(w, h3, y, k), rel=rtol)
    assert tab[(3, NC4)] == oneshot.nc4(w.to(dtype).double(), b.to(dtype).double(), h3, y, k)
    assert res.table[res.table.layer >= 0].rel_pos.isna().all()
    assert set(res.table[res.table.layer == -1].metric) == {EFFECTIVE_DEPTH}
    errs = [1 - tab[(i, PFC3)] for i in range(4)]
    assert tab[(-1, EFFECTIVE_DEPTH)] == oneshot.effective_depth(errs, 0.01)
    assert res.curves.empty
    # documented: the geodesic needs a trailing run of >= 2 layers of one width
    with pytest.raises(MetricInputError, match=r"trailing equal-shape run.*\[64, 64, 64, 48\]"):
        CollapseTracker(k, geodesic_ts=[0.0, 1.0]).update(hs, y)


@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_mixed_widths_path_over_trailing_run(cache_bytes):
    """Widths (48, 64, 64, 64) with geodesic_ts and a separate classifier input: the path
    quantities are those of layers 1..3 alone (one-shot functions), layer 0 has per-layer
    rows only, NC3/NC4 are measured on classifier_input and reported at the last layer."""
    from pfc_sweeps.collapse import metrics as oneshot

    k = 4
    hs, y = make_layers(41, n=200, k=k, dims=[48, 64, 64, 64])
    gen = torch.Generator().manual_seed(5)
    clf_in = torch.randn(200, 10, generator=gen, dtype=torch.float64) + hs[3][:, :10]
    w = torch.randn(k, 10, generator=gen, dtype=torch.float64)
    ts = [0.0, 0.4, 1.0]
    tr = CollapseTracker(k, geodesic_ts=ts, cache_bytes=cache_bytes, classifier_weight=w)
    for _ in range(2):
        for s in (slice(0, 77), slice(77, 200)):
            tr.update([h[s] for h in hs], y[s], classifier_input=clf_in[s])
        tr.end_pass()
        if not tr.needs_second_pass:
            break
    res = tr.compute()
    tab = lookup(res.table)
    run = hs[1:]
    for layer, h in enumerate(hs):
        for key, value in _oneshot_layer(h, y, k).items():
            assert tab[(layer, key)] == pytest.approx(value, rel=1e-12, abs=1e-13), (layer, key)
    rel = res.table.groupby("layer")["rel_pos"].first()
    assert math.isnan(rel.loc[0])
    np.testing.assert_allclose(rel.loc[[1, 2, 3]], oneshot.relative_positions(run), rtol=1e-12)
    assert (0, GEODESIC_ERR_METRICS[0]) not in tab and (1, GEODESIC_ERR_METRICS[0]) in tab
    curve = oneshot.geodesic_curve(run[0], run[-1], y, k, ts)
    for key in PFC_METRICS:
        got = res.curves[res.curves.metric == key]["value"].to_numpy()
        np.testing.assert_allclose(got, curve[key].numpy(), rtol=1e-12, atol=1e-13)
    assert tab[(-1, STRAIGHTNESS)] == pytest.approx(oneshot.straightness(run), rel=1e-12)
    assert tab[(-1, ENERGY_RATIO)] == pytest.approx(oneshot.energy_ratio(run), rel=1e-12)
    assert tab[(-1, THM1_INNER)] == pytest.approx(oneshot.thm1_inner(run[0], run[-1], y, k))
    assert tab[(-1, TRANSPORT_COST)] == pytest.approx(
        oneshot.transport_cost(run[0], run[-1], y, k), rel=1e-12
    )
    assert tab[(3, NC3)] == pytest.approx(oneshot.nc3(w, clf_in, y, k), rel=1e-12)
    assert tab[(3, NC4)] == oneshot.nc4(w, None, clf_in, y, k)
    assert (2, NC3) not in tab
    with pytest.raises(MetricInputError, match="classifier_input"):
        tr2 = CollapseTracker(k, classifier_weight=w)
        tr2.update(hs, y, classifier_input=clf_in)
        tr2.update(hs, y)  # given in the first batch, missing in the second


def test_single_layer_with_classifier():
    hs, y = make_layers(17, n=60, d=4, k=3, layers=1)
    w = torch.tensor(np.random.default_rng(2).normal(size=(3, 4)))
    res = run_tracker(hs, y, 3, classifier_weight=w, cache_bytes=0)
    tab = lookup(res.table)
    bf = layer_metrics(hs[0].numpy(), y.numpy(), 3)
    for key in (PFC1, PFC2, PFC3, NC1):
        assert tab[(0, key)] == pytest.approx(bf[key], rel=RTOL)
    clf = (hs[0].numpy() @ w.numpy().T).argmax(axis=1)  # bias None counts as 0
    assert tab[(0, NC4)] == pytest.approx(float(np.mean(clf != bf["_ncc"])), abs=1e-15)
    assert set(res.table[res.table.layer == -1].metric) == {EFFECTIVE_DEPTH}
    assert res.table.rel_pos.isna().all()


# ------------------------------------------------------------------------------------------
# streaming == one-shot; cached == two-pass
# ------------------------------------------------------------------------------------------
_ONE_SHOT: dict = {}


def _one_shot():
    if not _ONE_SHOT:
        hs, y = make_layers(4, n=60, d=4, k=3, layers=3)
        kw = {"geodesic_ts": torch.linspace(0, 1, 5), "classifier_weight": torch.eye(3, 4)}
        _ONE_SHOT.update(hs=hs, y=y, kw=kw, res=run_tracker(hs, y, 3, **kw))
    return _ONE_SHOT


def assert_same(a: CollapseResult, b: CollapseResult, rtol=1e-10):
    pd.testing.assert_frame_equal(a.table.drop(columns="value"), b.table.drop(columns="value"))
    np.testing.assert_allclose(a.table.value, b.table.value, rtol=rtol, atol=1e-13)
    pd.testing.assert_frame_equal(a.curves, b.curves, rtol=rtol, atol=1e-13)


@settings(max_examples=12, deadline=None)
@given(
    splits=st.lists(st.integers(min_value=1, max_value=59), max_size=6),
    cache=st.sampled_from([0, 2**30, 3000]),
    perm_seed=st.integers(0, 2**16),
)
def test_streaming_equals_one_shot_for_any_split(splits, cache, perm_seed):
    o = _one_shot()
    order2 = np.random.default_rng(perm_seed).permutation(60)  # pass 2 in any order
    res = run_tracker(
        o["hs"], o["y"], 3, splits=splits, cache_bytes=cache, order2=order2, **o["kw"]
    )
    assert_same(res, o["res"])


def test_cached_equals_two_pass_and_flags():
    hs, y = make_layers(5, n=80, d=6, k=4, layers=5)
    kw = {"geodesic_ts": torch.linspace(0, 1, 7)}
    one = CollapseTracker(4, **kw)
    feed(one, hs, y, splits=(30,))
    assert not one.needs_second_pass and one.cached_bytes == 0  # cache freed after use
    nbytes = sum(h.numel() * 8 for h in hs) + 80 * 8
    small = CollapseTracker(4, cache_bytes=nbytes - 1, **kw)  # overflows in the last batch
    feed(small, hs, y, splits=(30,))
    assert small.needs_second_pass
    feed(small, hs, y, splits=(11, 50))
    assert not small.needs_second_pass
    assert_same(one.compute(), small.compute(), rtol=1e-12)
    exact = CollapseTracker(4, cache_bytes=nbytes, **kw)
    feed(exact, hs, y, splits=(30,))
    assert not exact.needs_second_pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cache", [0, 2**30])
def test_small_chunks_and_blocks_match_one_chunk(monkeypatch, dtype, cache):
    """Work chunks of a few rows and blocks of a few chunks (uneven tails, several of each per
    batch) give the same statistics as one chunk per batch, on both precision paths."""
    import pfc_sweeps.collapse.inputs as M

    hs, y = make_layers(21, n=97, d=6, k=4, layers=5)
    hs = [h.to(dtype) for h in hs]
    kw = {
        "geodesic_ts": torch.linspace(0, 1, 9),
        "classifier_weight": torch.randn(
            4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        ),
        "cache_bytes": cache,
    }
    whole = run_tracker(hs, y, 4, splits=(40,), **kw)
    # 6 elements per row: 2 rows per pass-1 chunk (1 in float64), 3 per pass-2 chunk; a
    # block's per-row statistics: float64, 5 layers x width 12; float32
    # (kernels.FastKernel.row_elements), 3 S K + 2 K float32 and the K x K route's float64 Z
    # (2 S K)
    row = 5 * 12 if dtype == torch.float64 else (3 * 5 + 2) * 4 // 2 + 2 * 5 * 4
    monkeypatch.setattr(M, "_CPU_CHUNK_BYTES", 2 * 6 * dtype.itemsize)
    monkeypatch.setattr(M, "_CPU_PASS2_CHUNK_BYTES", 3 * 6 * dtype.itemsize)
    monkeypatch.setattr(M, "_CPU_BLOCK_ELEMENTS", 7 * row)
    monkeypatch.setattr(M, "_MIN_BLOCK_ROWS", 1)
    tracker = CollapseTracker(4, **kw)
    feed(tracker, hs, y, (40,))
    if tracker.needs_second_pass:
        feed(tracker, hs, y, (40,))
    core = tracker._run  # the trailing run's tracker (all layers: one width)
    assert core._rows1 == (1 if dtype == torch.float64 else 2)  # pass 1's chunks
    assert core._ws.rows == 3 and core._block_rows == 7  # pass 2's chunks and blocks
    assert_same(tracker.compute(), whole, rtol=1e-12 if dtype == torch.float64 else 1e-5)


@given(st.integers(0, 5000), st.integers(1, 700))
def test_even_sizes_split_rows_into_near_equal_parts(n, most):
    """Blocks and chunks: ceil(n / most) parts, each <= most, sizes within 1 of each other
    (no small tail whose GEMMs run slowly), summing to n."""
    sizes = even_sizes(n, most)
    assert sum(sizes) == n and len(sizes) == max(1, math.ceil(n / most))
    assert max(sizes) <= most and max(sizes) - min(sizes) <= 1


@given(st.integers(0, 50000), st.integers(1, 2000), st.sampled_from([2, 8, 16]))
def test_even_sizes_aligned_parts(n, most, align):
    """With an alignment (most >= 4 align): ceil(n / most') parts for most' = most rounded
    down to a multiple of align, each <= most, every part but the last a multiple of align,
    sizes within align of each other (no tiny tail), summing to n."""
    sizes = even_sizes(n, most, align)
    if most < 4 * align:
        assert sizes == even_sizes(n, most)
        return
    most_a = most // align * align
    assert sum(sizes) == n and len(sizes) == max(1, math.ceil(n / most_a))
    assert max(sizes) <= most_a and max(sizes) - min(sizes) <= align
    assert all(s % align == 0 for s in sizes[:-1]) and (n == 0 or min(sizes) > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_are_not_modified(dtype):
    hs, y = make_layers(16, n=70, d=5, k=3, layers=4)
    hs = [h.to(dtype) for h in hs]
    before = [h.clone() for h in hs]
    res = run_tracker(hs, y, 3, splits=(20,), geodesic_ts=[0.0, 1.0], cache_bytes=0)
    for h, b in zip(hs, before, strict=True):
        assert torch.equal(h, b)
    cached = run_tracker(hs, y, 3, splits=(20,), geodesic_ts=[0.0, 1.0])
    assert_same(res, cached, rtol=1e-12)


def test_state_memory_independent_of_n():
    sizes = []
    for n in (50, 400):
        hs, y = make_layers(6, n=n, d=7, k=5, layers=3)
        tr = CollapseTracker(5, geodesic_ts=torch.linspace(0, 1, 11), cache_bytes=0)
        for a in range(0, n, 25):
            tr.update([h[a : a + 25] for h in hs], y[a : a + 25])
        tr.end_pass()
        for a in range(0, n, 25):
            tr.update([h[a : a + 25] for h in hs], y[a : a + 25])
        sizes.append(tr.state_bytes)
        tr.end_pass()
    assert sizes[0] == sizes[1] > 0
    # O(L K d + K T): 3 layers x (K x d) means + K x K stats + 4 (batch x d) float64 chunk
    # buffers, far below N x d
    assert sizes[0] < 8 * (3 * 5 * 7 * 4 + 3 * 5 * 5 * 3 + 14 * 5 * 3 + 4 * 25 * 7 + 400)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_error_empty_class():
    hs, y = make_layers(7, n=40, k=3, layers=2)
    keep = y != 2
    tr = CollapseTracker(3)
    tr.update([h[keep] for h in hs], y[keep])
    with pytest.raises(EmptyClassError, match=r"\[2\]"):
        tr.end_pass()


def test_error_labels_out_of_range_and_bad_labels():
    hs, y = make_layers(8, n=30, k=3, layers=2)
    tr = CollapseTracker(3)
    with pytest.raises(MetricInputError, match=r"out of range.*0\.\.2"):
        tr.update(hs, torch.where(y == 0, 3, y))
    with pytest.raises(MetricInputError, match="integer"):
        tr.update(hs, y.float())
    with pytest.raises(MetricInputError, match=r"shape \(30,\)"):
        tr.update(hs, y[:5])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_error_nonfinite_features(value):
    hs, y = make_layers(9, n=30, k=3, layers=3)
    hs[1] = hs[1].clone()
    hs[1][4, 2] = value
    tr = CollapseTracker(3)
    tr.update(hs, y)
    with pytest.raises(MetricInputError, match="layer 1 contain NaN or inf"):
        tr.end_pass()


def test_error_nonfinite_in_second_pass():
    hs, y = make_layers(9, n=30, k=3, layers=2)
    tr = CollapseTracker(3, cache_bytes=0)
    feed(tr, hs, y, splits=())
    bad = hs[1].clone()
    bad[0, 0] = float("nan")
    tr.update([hs[0], bad], y)
    with pytest.raises(MetricInputError, match="NaN or inf"):
        tr.end_pass()


def test_error_geodesic_with_different_dims_at_first_update():
    hs, y = make_layers(10, n=30, k=3, dims=[4, 5])
    tr = CollapseTracker(3, geodesic_ts=[0.0, 1.0])
    with pytest.raises(MetricInputError, match=r"one dimension.*\[4, 5\]"):
        tr.update(hs, y)
    with pytest.raises(MetricInputError, match="2 layers"):
        CollapseTracker(3, geodesic_ts=[0.0, 1.0]).update(hs[:1], y)


def test_error_state_misuse():
    hs, y = make_layers(11, n=30, k=3, layers=3)
    tr = CollapseTracker(3)
    with pytest.raises(TrackerStateError, match="no batches"):
        tr.end_pass()
    tr.update(hs, y)
    with pytest.raises(TrackerStateError, match="end_pass"):
        tr.compute()
    with pytest.raises(MetricInputError, match="differ from the first batch"):
        tr.update(hs[:2], y)
    tr.end_pass()  # cached: done
    with pytest.raises(TrackerStateError, match="finalized"):
        tr.update(hs, y)  # second pass fed when not needed
    with pytest.raises(TrackerStateError, match="again"):
        tr.end_pass()
    res = tr.compute()
    assert tr.compute() is res
    with pytest.raises(TrackerStateError, match="finalized"):
        tr.update(hs, y)  # update after compute


def test_error_two_pass_misuse():
    hs, y = make_layers(12, n=30, k=3, layers=3)
    tr = CollapseTracker(3, cache_bytes=0)
    feed(tr, hs, y, splits=(10,))
    assert tr.needs_second_pass
    with pytest.raises(TrackerStateError, match="needs_second_pass"):
        tr.compute()
    with pytest.raises(TrackerStateError, match="no batch"):
        tr.end_pass()
    with pytest.raises(MetricInputError, match="differ from the first batch"):
        tr.update(hs[:2], y)  # a second pass with a different number of layers
    tr.update(hs, y)
    with pytest.raises(TrackerStateError, match="pass 2 is still open"):
        tr.compute()
    tr.update(hs, y)  # the data twice: counts differ
    with pytest.raises(MetricInputError, match="different data"):
        tr.end_pass()


def test_error_constructor_arguments():
    with pytest.raises(MetricInputError, match="num_classes"):
        CollapseTracker(1)
    with pytest.raises(MetricInputError, match=r"\[0, 1\]"):
        CollapseTracker(3, geodesic_ts=[0.0, 1.5])
    with pytest.raises(MetricInputError, match="cache_bytes"):
        CollapseTracker(3, cache_bytes=-1)
    with pytest.raises(MetricInputError, match="epsilon"):
        CollapseTracker(3, epsilon=2.0)
    with pytest.raises(MetricInputError, match="without classifier_weight"):
        CollapseTracker(3, classifier_bias=torch.zeros(3))
    hs, y = make_layers(13, n=30, d=4, k=3, layers=2)
    with pytest.raises(MetricInputError, match=r"shape \(3, 4\)"):
        CollapseTracker(3, classifier_weight=torch.zeros(3, 5)).update(hs, y)
    with pytest.raises(MetricInputError, match="list of per-layer"):
        CollapseTracker(3).update(hs[0], y)


def test_error_degenerate_layer():
    hs, y = make_layers(14, n=30, k=3, layers=2)
    tr = CollapseTracker(3)
    tr.update([hs[0], torch.zeros_like(hs[1])], y)
    tr.end_pass()
    with pytest.raises(DegenerateFeaturesError, match=r"layer\(s\) \[1\]"):
        tr.compute()


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_tracker_on_gpu_matches_cpu(cache_bytes):
    hs, y = make_layers(15, n=200, d=8, k=5, layers=4)
    hs = [h.float() for h in hs]
    kw = {
        "geodesic_ts": torch.linspace(0, 1, 9),
        "classifier_weight": torch.randn(5, 8),
        "classifier_bias": torch.randn(5),
        "cache_bytes": cache_bytes,
    }
    cpu = run_tracker(hs, y, 5, splits=(64, 128), **kw)
    gpu = run_tracker([h.cuda() for h in hs], y.cuda(), 5, splits=(64, 128), **kw)
    # both are within FAST_RTOL of the float64 truth (docs/precision.md), so of each other
    # within 2 FAST_RTOL: cuBLAS reduces in another order, and the K x K products are float32
    assert_same(gpu, cpu, rtol=2 * FAST_RTOL)
    tr = CollapseTracker(5)
    tr.update([h.cuda() for h in hs], torch.where(y.cuda() == 0, 7, y.cuda()))
    with pytest.raises(MetricInputError, match="out of range"):
        tr.end_pass()  # deferred on CUDA (no host sync per batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("k", "d"), [(5, 8), (40, 16)])  # the K x K and the d x d route
def test_tracker_update_never_syncs_with_the_host(k, d):
    """No host-device synchronisation inside update() on CUDA (issue 22 item 5)."""
    hs, y = make_layers(16, n=400, d=d, k=k, layers=4)
    hs, y = [h.float().cuda() for h in hs], y.cuda()
    tr = CollapseTracker(k, geodesic_ts=torch.linspace(0, 1, 5), cache_bytes=0)
    for p in range(2):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in range(0, 400, 100):  # pass 1, then pass 2: no sync in either
                tr.update([h[s : s + 100] for h in hs], y[s : s + 100])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tr.end_pass()
        if p == 0:
            assert tr.needs_second_pass
    assert not tr.compute().table.empty


# ------------------------------------------------------------------------------------------
# fast path (float32 features) vs float64 brute force (docs/precision.md)
# ------------------------------------------------------------------------------------------
FAST_RTOL = 1e-5  # the documented bound for PFC1-3, NC1-4 and the geodesic curves


def assert_fast_close(res, hs, y, k, ts, w=None, b=None):
    """Every continuous value within FAST_RTOL of the float64 brute force; accuracies within
    the near-tie count / N."""
    tab, yn = lookup(res.table), y.numpy()
    hn = [h.double().numpy() for h in hs]
    n, last = len(yn), len(hs) - 1
    for layer, h in enumerate(hn):
        want = layer_metrics(h, yn, k, *((w, b) if layer == last and w is not None else ()))
        for key, v in want.items():
            if key.startswith("_"):
                continue
            got = tab[(layer, key)]
            if key in (PFC3, NC4):
                assert abs(got - v) * n <= want["_ties"], (layer, key, got, v)
            else:
                assert got == pytest.approx(v, rel=FAST_RTOL), (layer, key)
    for t in ts:
        want = layer_metrics((1 - t) * hn[0] + t * hn[-1], yn, k)
        rows = res.curves[np.isclose(res.curves.t, t)].set_index("metric")["value"]
        assert rows[PFC1] == pytest.approx(want[PFC1], rel=FAST_RTOL), t
        assert rows[PFC2] == pytest.approx(want[PFC2], rel=FAST_RTOL), t
        assert abs(rows[PFC3] - want[PFC3]) * n <= want["_ties"], t


class DigitsNet(torch.nn.Module):
    """A small FC ResNet (independent of pfc_sweeps.nets.resnets): stem, 4 residual ReLU blocks."""

    def __init__(self, width: int = 48, blocks: int = 4) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(64, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))
        self.classifier = torch.nn.Linear(width, 10)

    def forward(self, x):
        h = self.stem(x)
        feats = [h]
        for lin in self.blocks:
            h = h + torch.relu(lin(h))
            feats.append(h)
        return self.classifier(h), feats


@pytest.fixture(scope="module")
def trained_digits():
    """float32 features of every layer of a net trained to ~100% train accuracy on digits."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    torch.manual_seed(0)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(25):
        for idx in torch.randperm(len(y)).split(64):
            loss = torch.nn.functional.cross_entropy(net(x[idx])[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        logits, feats = net(x)
    assert float((logits.argmax(1) == y).float().mean()) > 0.97  # really trained
    return feats, y, net.classifier.weight.detach(), net.classifier.bias.detach()


@pytest.mark.parametrize("cache_bytes", [2**30, 0])
def test_fast_path_matches_float64_brute_force_on_trained_digits(trained_digits, cache_bytes):
    hs, y, w, b = trained_digits
    assert all(h.dtype == torch.float32 for h in hs)
    ts = [0.0, 0.3, 0.7, 1.0]
    kw = {"geodesic_ts": ts, "classifier_weight": w, "classifier_bias": b}
    res = run_tracker(hs, y, 10, splits=(500, 1201), cache_bytes=cache_bytes, **kw)
    assert_fast_close(res, hs, y, 10, ts, w.numpy(), b.numpy())
    # the path and run-level quantities too
    exact = run_tracker([h.double() for h in hs], y, 10, splits=(500,), **kw)
    for key in (STRAIGHTNESS, ENERGY_RATIO, THM1_INNER, TRANSPORT_COST):
        got, want = lookup(res.table)[(-1, key)], lookup(exact.table)[(-1, key)]
        assert got == pytest.approx(want, rel=FAST_RTOL), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_on_a_near_collapsed_layer(dtype):
    """PFC1 ~ 1e-3, class means far from the origin (||g|| >> ||m_c - g||): the case where
    uncentred float32 sums would lose digits."""
    gen = torch.Generator().manual_seed(3)
    k, d, n = 6, 24, 3000
    y = torch.arange(n) % k
    centers = torch.randn(k, d, generator=gen)
    offset = 50.0 * torch.ones(d)
    h0 = offset + centers[y] + 0.5 * torch.randn(n, d, generator=gen)
    hl = offset + 2 * centers[y] + 0.04 * torch.randn(n, d, generator=gen)
    hs = [h0.to(dtype), ((h0 + hl) / 2).to(dtype), hl.to(dtype)]
    ts = [0.0, 0.5, 1.0]
    w = torch.randn(k, d, generator=gen)
    res = run_tracker(hs, y, k, splits=(700, 2000), geodesic_ts=ts, classifier_weight=w)
    pfc1 = lookup(res.table)[(2, PFC1)]
    assert 3e-4 < pfc1 < 3e-3  # near-collapsed indeed
    # brute force on the features as given (bf16 values are exact in float64)
    assert_fast_close(res, [h.float() for h in hs], y, k, ts, w.numpy())
