"""How the metric pass's cost grows with N, d, the number of layers L and K (issue 13).

For each axis, the others stay at a base point, and at every value this script times, side by
side (best of --repeat interleaved rounds):

- the bare forward pass (no_grad, eval) of an FC ResNet of width d with L residual blocks
  over N samples, batches of --batch: by default (--block bench) h + relu(W h + b) blocks
  on the input itself (one Linear, d^2 multiply-adds per sample and block); with --block
  preact_bn (mlp, mlp_bn, relu) the project's own FC ResNet (pfc_sweeps.nets: a Linear
  stem, then blocks of that type; preact_bn, the default of `arch`, has two Linears);
- the tracker alone on the cached float32 features of that forward (all metrics: PFC1-3,
  NC1-4, 101-t geodesic curves, path quantities), i.e. what a cached metric pass adds;

prints the ratio (forward + tracker) / forward next to its arithmetic floor (every per-sample
multiply-add at the forward's rate: `floor_ratio`). One more tracker run, in two passes with
no feature cache, gives the tracker's state and its time by phase: ``per-row`` is the ratio
(forward + the passes' updates) / forward, the part the floor describes, ``per-pass s`` the
seconds fixed per pass whatever N (class means, their float64 Grams, NC1's factorizations:
they grow with K and d, not N). Then it fits the exponent p of time ~ x^p (least squares in
log-log), prints one table, checks that the state does not grow with N, and saves a log-log
plot (PNG).

    python benchmarks/bench_scaling.py                 # quick: a few minutes on 2 CPU cores
    python benchmarks/bench_scaling.py --full          # the issue's ranges: N to 60k, d to 2048,
                                                       # L to 20, K to 1000 (a GPU, or patience)
    python benchmarks/bench_scaling.py --full --axes k --block preact_bn   # the project's FC net
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path

import numpy as np
import torch

from pfc_sweeps.choices import BLOCKS
from pfc_sweeps.collapse.tracker import CollapseTracker
from pfc_sweeps.nets.resnets import build_model

QUICK = {
    "base": {"n": 2000, "d": 256, "layers": 4, "k": 10},
    "n": [1000, 2000, 4000, 8000],
    "d": [128, 256, 512, 1024],
    "layers": [2, 4, 8, 16],
    "k": [10, 100, 1000],
}
FULL = {
    "base": {"n": 10000, "d": 512, "layers": 10, "k": 10},
    "n": [1000, 4000, 15000, 60000],
    "d": [128, 256, 512, 1024, 2048],
    "layers": [2, 5, 10, 20],
    "k": [10, 100, 1000],
}
LABELS = {"n": "N (samples)", "d": "d (width)", "layers": "L (blocks)", "k": "K (classes)"}


class FCResNet(torch.nn.Module):
    """h_0 = x, h_{l+1} = h_l + relu(W_l h_l + b_l); features of layers 0..L, then a classifier."""

    def __init__(self, d: int, layers: int, k: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.classifier = torch.nn.Linear(d, k)

    def forward(self, x):
        feats = [x]
        for lin in self.blocks:
            x = x + torch.relu(lin(x))
            feats.append(x)
        return self.classifier(x), feats


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_point(n: int, d: int, layers: int, k: int, args, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    centers = torch.randn(k, d, generator=gen)
    x = (centers[y] + torch.randn(n, d, generator=gen)).to(device)
    y = y.to(device)
    torch.manual_seed(0)
    model = make_net(args.block, d, layers, k).to(device).eval()
    batch, ts = args.batch, torch.linspace(0, 1, 101)
    feats: list = []

    @torch.no_grad()
    def forward():
        feats.clear()
        for s in range(0, n, batch):
            feats.append((model(x[s : s + batch])[1], y[s : s + batch]))

    def make(cache_bytes: int) -> CollapseTracker:
        return CollapseTracker(
            k,
            geodesic_ts=ts,
            cache_bytes=cache_bytes,
            classifier_weight=model.classifier.weight.detach(),
            classifier_bias=model.classifier.bias.detach(),
        )

    def tracker() -> None:  # the cached pass: pass 1 caches, its end_pass runs pass 2
        tr = make(2**40)
        for f, yb in feats:
            tr.update(f, yb)
        tr.end_pass()
        tr.compute()

    best = {"forward": math.inf, "tracker": math.inf}
    for rnd in range(args.repeat + 1):  # round 0 warms up
        for name, fn in (("forward", forward), ("tracker", tracker)):
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if rnd > 0:
                best[name] = min(best[name], time.perf_counter() - t0)
    tr = make(0)  # two passes, no cache: the state alone, and the time by phase
    phases = two_pass_phases(tr, feats, device)
    floor = floor_ratio(linear_macs(model), d, layers, k)
    return {**best, **phases, "state_mib": tr.state_bytes / 2**20, "floor": floor}


def two_pass_phases(tr: CollapseTracker, feats: list, device: torch.device) -> dict:
    """Seconds of one two-pass tracker run by phase: ``per_row`` the updates of both passes
    (work that grows with N), ``per_pass`` the ends of the passes and compute (class means,
    their float64 Grams, NC1's factorizations: fixed per pass, whatever N)."""
    per_row = per_pass = 0.0
    for batches, finish in ((feats, tr.end_pass), (feats, tr.end_pass), ((), tr.compute)):
        sync(device)
        t0 = time.perf_counter()
        for f, yb in batches:  # pass 1, pass 2, then none before compute
            tr.update(f, yb)
        sync(device)
        t1 = time.perf_counter()
        finish()
        sync(device)
        per_row, per_pass = per_row + t1 - t0, per_pass + time.perf_counter() - t1
    return {"per_row": per_row, "per_pass": per_pass}


def make_net(block: str, d: int, layers: int, k: int) -> torch.nn.Module:
    """The benchmark's FC ResNet (``bench``) or the project's with residual blocks ``block``;
    the blocks' Linear weights halved (a residual stream bounded over 20 blocks)."""
    if block == "bench":
        model = FCResNet(d, layers, k)
    else:
        model = build_model("fc", (d,), k, width=d, blocks=layers, block=block)
    for blk in model.blocks:
        for lin in blk.modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.data.mul_(0.5)
    return model


def linear_macs(model: torch.nn.Module) -> int:
    """Multiply-adds per sample of the model's Linear layers (its forward's arithmetic)."""
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip


def floor_ratio(forward_macs: int, d: int, layers: int, k: int) -> float:
    """The cached pass / forward ratio if every multiply-add ran at the forward's rate: per
    sample, the forward costs ``forward_macs`` (bench: L d^2 + K d, blocks and classifier);
    the tracker K d per layer (projections on the class means: NCC), min(d, K)^2 per layer
    (NC1's Z^T Z or d x d scatter), and 2 K d once (the geodesic's mixed terms, the
    classifier's logits)."""
    tracker = (layers + 1) * (k * d + min(d, k) ** 2) + 2 * k * d
    return 1.0 + tracker / forward_macs


def _grid(p: argparse.ArgumentParser, args, axes: list[str]) -> dict:
    """The grid of --full (or the quick one), with --base and --values applied."""
    grid = {**(FULL if args.full else QUICK)}
    grid["base"] = dict(grid["base"])
    for item in filter(None, args.base.split(",")):
        key, _, val = item.partition("=")
        if key not in grid["base"] or not val.isdigit() or int(val) < 1:
            p.error(f"--base takes n=,d=,layers=,k= positive ints, got {item!r}")
        grid["base"][key] = int(val)
    if args.values:
        vals = args.values.split(",")
        if len(axes) != 1 or not all(v.isdigit() and int(v) > 0 for v in vals):
            p.error(f"--values needs one axis and positive ints, got {args.values!r}")
        grid[axes[0]] = [int(v) for v in vals]
    return grid


def fit(xs: list[float], ts: list[float]) -> float:
    """Exponent p of t ~ x^p (least squares on log t vs log x); NaN below two values."""
    if len(set(xs)) < 2:
        return math.nan
    return float(np.polyfit(np.log(xs), np.log(ts), 1)[0])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4))
    for ax, (axis, rows) in zip(np.atleast_1d(axes), results.items(), strict=True):
        xs = [r["x"] for r in rows]
        for key, style in (("forward", "o-"), ("tracker", "s-")):
            ax.loglog(xs, [r[key] for r in rows], style, label=key)
        ax.set_xlabel(LABELS[axis])
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("metric pass (tracker, all metrics) vs bare forward pass")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="the issue's ranges (slow on a CPU)")
    p.add_argument("--axes", default="n,d,layers,k", help="comma-separated subset of n,d,layers,k")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=2, help="best of this many interleaved rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--png", default="bench_scaling.png", help="where to save the plot")
    p.add_argument("--block", default="bench", choices=("bench", *BLOCKS),
                   help="bench: h + relu(W h + b) on the input; else the project's FC ResNet")  # fmt: skip
    p.add_argument("--base", default="", help="override base values, e.g. n=500,d=32")
    p.add_argument("--values", default="", help="the axis values (one axis), e.g. 10,40")
    args = p.parse_args(argv)
    axes = args.axes.split(",")
    if set(axes) - set(LABELS):
        p.error(f"--axes must be a subset of n,d,layers,k, got {args.axes!r}")
    grid = _grid(p, args, axes)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"bench_scaling: device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, block {args.block}, base {grid['base']}")  # fmt: skip
    results: dict[str, list[dict]] = {}
    print(f"{'axis':>6} {'value':>6} {'forward s':>10} {'tracker s':>10} {'ratio':>6} "
          f"{'floor':>6} {'per-row':>7} {'per-pass s':>10} {'state MiB':>9}")  # fmt: skip
    for axis in axes:
        results[axis] = []
        for v in grid[axis]:
            point = {**grid["base"], axis: v}
            r = one_point(point["n"], point["d"], point["layers"], point["k"], args, device)
            r["x"] = v
            results[axis].append(r)
            ratio = (r["forward"] + r["tracker"]) / r["forward"]
            row_ratio = (r["forward"] + r["per_row"]) / r["forward"]
            print(f"{axis:>6} {v:>6} {r['forward']:>10.3f} {r['tracker']:>10.3f} "
                  f"{ratio:>6.2f} {r['floor']:>6.2f} {row_ratio:>7.2f} {r['per_pass']:>10.3f} "
                  f"{r['state_mib']:>9.2f}", flush=True)  # fmt: skip
    print("\nfitted exponents, time ~ x^p (cached metric pass = forward + tracker):")
    print(f"{'axis':>6} {'p forward':>10} {'p tracker':>10}  expected")
    expect = {"n": "1, 1", "d": "2, <= 1", "layers": "1, 1", "k": "~0, >= 1 (K x K work)"}
    for axis, rows in results.items():
        xs = [r["x"] for r in rows]
        pf, pt = fit(xs, [r["forward"] for r in rows]), fit(xs, [r["tracker"] for r in rows])
        if math.isnan(pf):  # one value: nothing to fit
            print(f"{axis:>6} {'-':>10} {'-':>10}  {expect[axis]} (one value, no fit)")
            continue
        print(f"{axis:>6} {pf:>10.2f} {pt:>10.2f}  {expect[axis]}")
    if "n" in results:
        states = {r["x"]: r["state_mib"] for r in results["n"]}
        flat = len(set(states.values())) == 1
        print(f"tracker state vs N: {states} MiB -> {'flat in N' if flat else 'GROWS WITH N'}")
    if "k" in results and max(r["x"] for r in results["k"]) >= 1000:
        print("K=1000 ran (K x K Grams and pinv included)")
    plot(results, Path(args.png))
    print(f"plot saved to {args.png}")


if __name__ == "__main__":
    main()
