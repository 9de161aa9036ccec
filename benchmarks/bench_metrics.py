"""Benchmark of the metric engine (issue 2). Prints ratios measured side by side in one run.

(a) CollapseTracker vs the naive peer method (store all features of all layers, build the
    d x d Sigma_W and Sigma_B in float64, pinv), MNIST-scale synthetic features
    N=60000, d=1000, L+1=11 layers, K=10. Goal: >= 10x faster; tracker state independent of N.
(b) Geodesic curves at 101 values of t vs no curves (4x --repeat rounds). Goal: <= 1.05x.
(c) The metrics pass vs a bare model.eval() forward pass over the same data, FC ResNet of
    width 1000 with 10 blocks (pfc_sweeps.nets.resnets.build_model), cached (one forward) and
    two-pass (two forwards). Goals: <= 1.15x (cached), <= 2.15x (two-pass).

The float32 features take the tracker's fast path (docs/precision.md). On CPU the script
keeps freed memory for reuse, as CPU training jobs do (pfc_sweeps.collapse.allocator); run with
--no-retain to see glibc's default. Times are the best
of --repeat interleaved rounds and ratios are ratios of best times; in parentheses, the
median over rounds of the ratio of two times taken back to back in one round.

Usage: python benchmarks/bench_metrics.py [--scale 0.1] [--parts abc] [--device cpu|cuda]
--scale multiplies N (d, L, K stay at the paper's MNIST values unless --dim/--layers are given).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable

import torch

from pfc_sweeps.collapse.allocator import retain_freed_memory
from pfc_sweeps.collapse.metrics import pfc_metrics
from pfc_sweeps.collapse.tracker import CollapseTracker
from pfc_sweeps.results.schema import NC1, PFC1, PFC3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings(dict):
    """Best wall time per variant (the dict), plus every round's times."""

    def __init__(self, rounds: list[dict[str, float]]) -> None:
        super().__init__({k: min(r[k] for r in rounds) for k in rounds[0]})
        self.rounds = rounds

    def ratio(self, num: str, den: str) -> float:
        """Ratio of the best times. The noise of a shared machine comes in bursts that only add
        time, so a variant's best round is the estimate of its cost."""
        return self[num] / self[den]

    def paired(self, num: str, den: str) -> float:
        """Median over rounds of num / den timed back to back in one round (a cross-check that
        is robust to slow drift but not to bursts)."""
        return statistics.median(r[num] / r[den] for r in self.rounds)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> Timings:
    """Wall time of each function in `repeat` rounds, run round-robin (interleaved, so that
    load drift on a shared machine hits every variant alike), after one warm-up round."""
    rounds = []
    for rnd in range(repeat + 1):
        times = {}
        for name, fn in fns.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name] = time.perf_counter() - t0
        if rnd > 0 or repeat == 0:
            rounds.append(times)
    return Timings(rounds)


def synthetic_layers(n: int, d: int, layers: int, k: int, device, seed: int = 0, sep=0.3):
    """Class-structured float32 features whose within-class spread shrinks with depth
    (sep=0: no class structure, NCC near chance)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=gen)]
    centers = torch.randn(k, d, generator=gen) * sep
    feats = []
    for layer in range(layers):
        spread = 1.0 / (1.0 + layer)
        h = torch.randn(n, d, generator=gen).mul_(spread)
        h += centers[y] * (1.0 + 0.5 * layer)
        feats.append(h.to(device))
    return feats, y.to(device)


def naive_peer(feats: list[torch.Tensor], y: torch.Tensor, k: int) -> list[dict[str, float]]:
    """The peer method: all features stored, d x d covariances in float64, pinv (Papyan et al.)."""
    out = []
    onehot = torch.nn.functional.one_hot(y, k).to(torch.float64)  # (N, K)
    counts = onehot.sum(0)
    for h in feats:
        x = h.to(torch.float64)  # (N, d)
        means = (onehot.T @ x) / counts[:, None]  # (K, d)
        g = means.mean(0)
        r = x - means[y]  # (N, d)
        sigma_w = r.T @ r / x.shape[0]  # (d, d)
        c = means - g
        sigma_b = c.T @ c / k  # (d, d)
        nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b)) / k
        pfc1 = torch.trace(sigma_w) / torch.trace(sigma_b)
        dist = torch.cdist(x, means)  # (N, K) NCC
        pfc3 = (dist.argmin(1) == y).double().mean()
        out.append({PFC1: float(pfc1), NC1: float(nc1), PFC3: float(pfc3)})
    return out


def run_tracker(feats, y, k, batch, *, ts=None, cache_bytes=0) -> CollapseTracker:
    tr = CollapseTracker(k, geodesic_ts=ts, cache_bytes=cache_bytes)
    n = y.shape[0]
    for _ in range(2):
        for s in range(0, n, batch):
            tr.update([h[s : s + batch] for h in feats], y[s : s + batch])
        tr.end_pass()
        if not tr.needs_second_pass:
            break
    tr.compute()
    return tr


def part_a(args, device) -> None:
    n = max(args.classes * 2, round(60000 * args.scale))
    feats, y = synthetic_layers(n, args.dim, args.layers, args.classes, device)
    out: dict = {}
    t = timed(
        {
            "naive": lambda: out.__setitem__("naive", naive_peer(feats, y, args.classes)),
            "tracker": lambda: out.__setitem__(
                "tracker", run_tracker(feats, y, args.classes, args.batch)
            ),
        },
        device,
        min(args.repeat, 2),  # a 10x+ ratio: two rounds of the slow peer suffice
    )
    res = out["tracker"].compute().table
    got = res[res.metric == NC1].sort_values("layer").value.tolist()
    err = max(abs(a - b[NC1]) / abs(b[NC1]) for a, b in zip(got, out["naive"], strict=True))
    # state memory at N and N/2 (must be equal)
    half = run_tracker([h[: n // 2] for h in feats], y[: n // 2], args.classes, args.batch)
    print(
        f"(a) N={n} d={args.dim} layers={args.layers} K={args.classes} batch={args.batch}: "
        f"naive {t['naive']:.3f}s, tracker (two passes, no cache) {t['tracker']:.3f}s -> "
        f"speedup {t.ratio('naive', 'tracker'):.1f}x (goal >= 10x); max rel. diff of NC1 vs "
        f"naive {err:.1e}"
    )
    print(
        f"    tracker state incl. chunk workspace: {out['tracker'].state_bytes / 2**20:.2f} MiB "
        f"at N={n}, {half.state_bytes / 2**20:.2f} MiB at N={n // 2} (independent of N); "
        f"naive stores {sum(h.numel() * h.element_size() for h in feats) / 2**20:.0f} MiB of "
        f"features + 2 d x d float64 matrices"
    )


def part_b(args, device) -> None:
    n = max(args.classes * 2, round(60000 * args.scale))
    ts = torch.linspace(0, 1, 101)
    for label, sep in (("class-structured", 0.3), ("no class structure (hard case)", 0.0)):
        feats, y = synthetic_layers(n, args.dim, args.layers, args.classes, device, 1, sep)
        fns = {}
        for mode, cache in (("two-pass", 0), ("cached", 2**40)):
            fns[mode] = lambda c=cache, f=feats, y=y: run_tracker(
                f, y, args.classes, args.batch, cache_bytes=c
            )
            fns[mode + "+geo"] = lambda c=cache, f=feats, y=y: run_tracker(
                f, y, args.classes, args.batch, ts=ts, cache_bytes=c
            )
        t = timed(fns, device, 4 * args.repeat)  # short runs: 4x the rounds
        rows = [
            f"{m}: {t[m]:.3f}s -> {t[m + '+geo']:.3f}s = {t.ratio(m + '+geo', m):.3f}x "
            f"({t.paired(m + '+geo', m):.3f}x)"
            for m in ("two-pass", "cached")
        ]
        print(
            f"(b) tracker alone, geodesic curves at 101 t vs none, N={n}, {label}, goal <= 1.05x: "
            + "; ".join(rows)
        )


def fc_resnet(device):
    try:
        from pfc_sweeps.nets.resnets import build_model

        return build_model("fc", (1, 28, 28), 10, width=1000, blocks=10, block="relu").to(device)
    except ImportError:  # pragma: no cover - local equivalent h + relu(W h + b)
        return LocalFCResNet().to(device)


class LocalFCResNet(torch.nn.Module):
    def __init__(self, width: int = 1000, blocks: int = 10, classes: int = 10) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(784, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))
        self.classifier = torch.nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x.flatten(1))
        feats = [h]
        for lin in self.blocks:
            h = h + torch.relu(lin(h))
            feats.append(h)
        return self.classifier(h), feats


def part_c(args, device) -> None:
    n = max(20, round(60000 * args.scale))
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(n, 1, 28, 28, generator=gen).to(device)
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=gen)].to(device)
    model = fc_resnet(device).eval()
    batch = args.batch

    @torch.no_grad()
    def bare():
        for s in range(0, n, batch):
            model(x[s : s + batch])

    @torch.no_grad()
    def metrics(cache_bytes: int, ts=None):
        tr = CollapseTracker(
            10,
            cache_bytes=cache_bytes,
            geodesic_ts=ts,
            classifier_weight=model.classifier.weight,
            classifier_bias=model.classifier.bias,
        )
        for _ in range(2):
            for s in range(0, n, batch):
                _, feats = model(x[s : s + batch])
                tr.update(feats, y[s : s + batch])
            tr.end_pass()
            if not tr.needs_second_pass:
                break
        tr.compute()
        return tr

    ts = torch.linspace(0, 1, 101)
    t = timed(
        {
            "bare": bare,
            "cached": lambda: metrics(2**40),
            "two-pass": lambda: metrics(0),
            "cached+geo": lambda: metrics(2**40, ts),
            "two-pass+geo": lambda: metrics(0, ts),
        },
        device,
        args.repeat,
    )
    r = {k: f"{t.ratio(k, 'bare'):.2f}x ({t.paired(k, 'bare'):.2f}x)" for k in t}
    print(
        f"(c) FC ResNet width 1000, 10 blocks, N={n}, batch={batch}, all metrics incl. NC3/NC4: "
        f"bare forward "
        f"{t['bare']:.3f}s; cached {t['cached']:.3f}s = {r['cached']} (goal <= 1.15x); "
        f"two-pass {t['two-pass']:.3f}s = {r['two-pass']} (goal <= 2.15x); plus the 101-t "
        f"geodesic: cached {r['cached+geo']}, two-pass {r['two-pass+geo']}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="multiply N (60000) by this")
    p.add_argument("--dim", type=int, default=1000)
    p.add_argument("--layers", type=int, default=11, help="number of feature layers (L + 1)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument(
        "--repeat", type=int, default=7, help="interleaved rounds (times: best; ratios: median)"
    )
    p.add_argument("--parts", default="abc", help="subset of 'abc'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--no-retain", action="store_true", help="glibc's default: freed memory is returned"
    )
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    if set(args.parts) - set("abc"):
        p.error(f"--parts must be a subset of 'abc', got {args.parts!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # as CPU training jobs do (pfc_sweeps.collapse.allocator): freed feature caches keep their pages
    retained = device.type == "cpu" and not args.no_retain and retain_freed_memory()
    print(
        f"bench_metrics: device {name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, scale {args.scale}, "
        f"freed memory retained: {retained}"
    )
    # sanity: the engine is exact on a tiny problem before timing anything
    feats, y = synthetic_layers(200, 8, 2, 4, device)
    assert math.isfinite(pfc_metrics(feats[0], y, 4)[PFC1])
    for part in args.parts:
        {"a": part_a, "b": part_b, "c": part_c}[part](args, device)


if __name__ == "__main__":
    main()
