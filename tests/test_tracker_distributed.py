"""CollapseTracker(process_group=...) and collapse_table(process_group=...) in 2 and 3 gloo
processes equal the single-process tracker: real values to 1e-9 relative, counts exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pfc_sweeps.collapse.network import collapse_table
from pfc_sweeps.collapse.tracker import CollapseTracker
from pfc_sweeps.results.schema import NC4, PFC3

K, N, D = 5, 157, 6
TS = [0.0, 0.3, 0.5, 1.0]
COUNT_METRICS = (PFC3, NC4)  # counts / N: must be equal exactly


def make_data(dtype=torch.float64, d: int = D):
    """4 layers of width d with class structure; labels 0..K-1, every class present (d >= K:
    NC1's K x K route; d < K: the d x d route)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.arange(K), torch.randint(0, K, (N - K,), generator=gen)])
    centres = torch.randn(K, d, generator=gen, dtype=torch.float64)
    h = centres[y] + torch.randn(N, d, generator=gen, dtype=torch.float64)
    hs = [h]
    for _ in range(3):
        w = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.5
        hs.append(hs[-1] + torch.relu(hs[-1] @ w) + 0.4 * centres[y])
    w = torch.randn(K, d, generator=gen, dtype=torch.float64)
    b = torch.randn(K, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in hs], y, w, b


def shards(y: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Uneven index shards; the last class never reaches shard 0."""
    order = torch.cat([(y != K - 1).nonzero().flatten(), (y == K - 1).nonzero().flatten()])
    sizes = [20 + 13 * r for r in range(world - 1)]
    sizes.append(len(y) - sum(sizes))
    return list(order.split(sizes))


def tracker_result(hs, y, w, b, cache_bytes, group, batch=17):
    tr = CollapseTracker(
        K,
        geodesic_ts=TS,
        cache_bytes=cache_bytes,
        classifier_weight=w,
        classifier_bias=b,
        process_group=group,
    )
    for _ in range(2):
        for s in range(0, len(y), batch):
            tr.update([h[s : s + batch] for h in hs], y[s : s + batch])
        tr.end_pass()
        if not tr.needs_second_pass:
            break
    res = tr.compute()
    return res.table, res.curves


class TinyNet(nn.Module):
    """Layers of widths 7, then 6, 6, 6 (a head layer and a path run), classifier on the last."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.a = nn.Linear(D, 7).double()
        self.b = nn.Linear(7, D).double()
        self.c = nn.Linear(D, D).double()
        self.classifier = nn.Linear(D, K).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64)

    def forward(self, x):
        h1 = torch.tanh(self.a(x))
        h2 = self.b(h1)
        h3 = h2 + torch.tanh(self.c(h2))
        h4 = h3 + torch.tanh(self.c(h3))
        return self.classifier(h4), [h1, h2, h3, h4]


class ShardData:
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def size(self, split):
        return len(self.y)

    def batches(self, split, order, batch):
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            yield self.x[idx], self.y[idx]


def all_results(rank: int, world: int, group) -> dict:
    out = {}
    for dtype in (torch.float64, torch.float32):
        for d in (D, 3):  # both NC1 routes
            hs, y, w, b = make_data(dtype, d)
            idx = shards(y, world)[rank] if group is not None else torch.arange(len(y))
            for cache in (2**30, 0):
                key = (str(dtype), cache, d)
                out[key] = tracker_result([h[idx] for h in hs], y[idx], w, b, cache, group)
    hs, y, _, _ = make_data()
    idx = shards(y, world)[rank] if group is not None else torch.arange(len(y))
    for cache in (2**30, 0):
        out[("table", cache)] = collapse_table(
            TinyNet(),
            ShardData(hs[0][idx], y[idx]),
            "train",
            K,
            geodesic_ts=torch.tensor(TS),
            cache_bytes=cache,
            batch=23,
            process_group=group,
        )
    return out


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = all_results(rank, world, dist.group.WORLD)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(res, f)
    finally:
        dist.destroy_process_group()


def assert_frames_match(got: pd.DataFrame, want: pd.DataFrame, rtol: float, what: str) -> None:
    assert list(got.columns) == list(want.columns), what
    keys = [c for c in ("layer", "metric", "t") if c in want.columns]
    assert got[keys].astype(str).equals(want[keys].astype(str)), what
    counts = want["metric"].isin(COUNT_METRICS).to_numpy()
    g, w = got["value"].to_numpy(), want["value"].to_numpy()
    np.testing.assert_array_equal(g[counts], w[counts], err_msg=what)
    np.testing.assert_allclose(g[~counts], w[~counts], rtol=rtol, atol=1e-13, err_msg=what)
    if "rel_pos" in want.columns:
        np.testing.assert_allclose(got["rel_pos"], want["rel_pos"], rtol=rtol, err_msg=what)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_tracker_equals_single_process(world, tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(tmp_path)), nprocs=world, join=True)
    single = all_results(0, 1, None)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    for key, (table, curves) in single.items():
        # float32: each rank centres its float32 sums at its own reference (docs/precision.md)
        rtol = 1e-5 if "float32" in key[0] else 1e-9
        for r, res in enumerate(ranks):
            got_table, got_curves = res[key]
            assert_frames_match(got_table, table, rtol, f"{key} rank {r} table")
            assert_frames_match(got_curves, curves, rtol, f"{key} rank {r} curves")
        for res in ranks[1:]:  # every rank holds the same result, bit for bit
            pd.testing.assert_frame_equal(res[key][0], ranks[0][key][0])


def test_process_group_must_be_a_group():
    with pytest.raises(ValueError, match="process_group"):
        CollapseTracker(3, process_group="default")
