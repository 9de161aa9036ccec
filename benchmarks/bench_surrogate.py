"""Benchmark of the batched MUFM solver (issue 3): the paper_fig5 lam grid, side by side.

Times, in one run and interleaved (so load drift on a shared machine hits all alike):
  batched : the whole grid (40 lam values in [0.0005, 0.02], lam_w = 0.005) as one tensor program
  loop    : a Python loop over the grid, one solve per lam
  single  : one lam alone (lam = 0.001)
  plain   : the batched grid without the H step guard (h_step_guard=False), i.e. the guard's
            cost; timed only for seeds that plain GD survives (e.g. 2; seed 0 diverges)
and prints batched / single (goal: <= 2x) and loop / batched (goal: >= 20x for 40 values).
Paper setting otherwise: K=5, d=20, n=100, MSE, GD lr 0.1, per-sample H step with the step
guard (the default; see pfc_sweeps/surrogate/), seed 0.

Usage: python benchmarks/bench_surrogate.py [--steps 5000] [--lams 40] [--repeat 1]
       [--log-every N] [--method auto|direct] [--threads 1] [--dtype float64|float32]
       [--seed 0] [--no-guard]
--steps 50000 is the paper's length (the loop then takes ~40 single solves).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from pfc_sweeps.surrogate.objective import SurrogateDivergedError, make_gaussian_data
from pfc_sweeps.surrogate.solver import solve_batched


def timed(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best wall time of each function over `repeat` interleaved rounds (after a warm-up)."""
    best = dict.fromkeys(fns, math.inf)
    for rnd in range(repeat + 1):
        for name, fn in fns.items():
            if rnd == 0 and name == "loop":
                continue  # the loop is the batched code path B times: no separate warm-up
            gc.collect()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if rnd > 0:
                best[name] = min(best[name], dt)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--lams", type=int, default=40, help="grid size in [0.0005, 0.02]")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--log-every", type=int, default=None, help="default: first + last step")
    p.add_argument("--method", default="auto", choices=["auto", "direct", "subspace"])
    p.add_argument("--threads", type=int, default=1, help="torch threads during each solve")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-guard", action="store_true", help="plain GD (h_step_guard=False)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    X, labels = make_gaussian_data(5, 20, 100, a.seed, device=a.device)
    lams = np.linspace(0.0005, 0.02, a.lams).tolist()
    kw = dict(
        lam_w=0.005, models="mufm", loss="mse", lr=0.1, steps=a.steps, log_every=a.log_every,
        seeds=a.seed, method=a.method, num_threads=a.threads, dtype=getattr(torch, a.dtype),
        h_step_guard=not a.no_guard,
    )  # fmt: skip

    def batched():
        return solve_batched(X, labels, 5, lams, **kw)

    def loop():
        return [solve_batched(X, labels, 5, [lam], **kw) for lam in lams]

    def single():
        return solve_batched(X, labels, 5, [0.001], **kw)

    def plain():
        return solve_batched(X, labels, 5, lams, **{**kw, "h_step_guard": False})

    fns = {"batched": batched, "loop": loop, "single": single}
    if not a.no_guard:
        try:  # plain GD diverges within ~10 steps for about half of the seeds
            solve_batched(
                X, labels, 5, lams, **{**kw, "steps": min(a.steps, 200), "h_step_guard": False}
            )
            fns["plain"] = plain
        except SurrogateDivergedError as e:
            print(f"plain (no guard): diverges for seed {a.seed} by step {e.step}, not timed")

    # the batched result equals the looped one (same init for every lam)
    short = {**kw, "steps": min(a.steps, 500)}
    b = solve_batched(X, labels, 5, lams[:3], **short)
    err = max(
        (b.H[i] - solve_batched(X, labels, 5, [lam], **short).H[0]).abs().max().item()
        for i, lam in enumerate(lams[:3])
    )

    t = timed(fns, a.repeat)
    guarded = b.guarded_steps
    print(
        f"paper_fig5 grid: {a.lams} lam x {a.steps} GD steps, method={a.method}, "
        f"threads={a.threads}, {a.dtype}, device={a.device}, log_every={a.log_every}, "
        f"seed={a.seed}, h_step_guard={not a.no_guard} (active {min(guarded)}-{max(guarded)} "
        f"of the first {short['steps']} steps)"
    )
    for name, sec in t.items():
        print(f"  {name:8s} {sec:9.3f} s   ({sec / a.steps * 1e6:8.1f} us/step)")
    print(f"  batched / single = {t['batched'] / t['single']:.2f}x   (goal <= 2x)")
    print(f"  loop / batched   = {t['loop'] / t['batched']:.2f}x   (goal >= 20x for 40 lam)")
    print(f"  loop / single    = {t['loop'] / t['single']:.2f}x")
    if "plain" in t:
        print(f"  batched / plain  = {t['batched'] / t['plain']:.2f}x   (cost of the H step guard)")
    print(f"  max |H_batched - H_looped| after {short['steps']} steps: {err:.2e}")


if __name__ == "__main__":
    main()
