"""The training options on one device, a few steps each: does the metric pass stay full float32?

For each option (fp32, bf16, fp16, channels_last, compile, tf32 on and off) a conv net of
Table I's kind on CIFAR-shaped data (3x32x32, 10 classes, class-structured Gaussian noise)
is trained for --steps SGD steps as a job with that option would (``configure_job``,
``prepare_model``, ``Accelerator``). Then its metric rows are measured twice on the same
weights:

- the jobs' way: with the flags the option left set, the cache decided first
  (``metric_cache_bytes``) and the pass inside ``full_float32``;
- the reference: TF32 off, no autocast, plain ``collapse_table``.

The two must agree within the metric engine's documented float32 bound (1e-5 relative; they
are equal bit for bit when the guard works and kernels are deterministic). The table also
shows the last training loss, the fp16 loss scale and the steps' time. Exit status 1 when an
option's rows differ by more than the bound or its loss is not finite.

    python benchmarks/device_options.py [--options fp32,bf16,fp16,channels_last,compile,tf32]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import pandas as pd
import torch

from pfc_sweeps.collapse.network import collapse_table
from pfc_sweeps.config import TrainConfig
from pfc_sweeps.data.bundles import DataBundle
from pfc_sweeps.jobs.accel import (
    Accelerator,
    configure_job,
    full_float32,
    metric_cache_bytes,
    prepare_model,
    set_tf32,
)
from pfc_sweeps.nets.resnets import build_model

BOUND = 1e-5  # docs/precision.md: the float32 fast path, relative
OPTIONS = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "tf32": {"tf32": True},
    "tf32-off": {"tf32": False},
}
STAGES = [[32, 32, 1], [64, 16, 2], [128, 8, 2]]
TINY_STAGES = [[4, 8, 1], [8, 4, 2]]  # --tiny: 3x8x8 images (a CPU smoke run)


def cifar_shaped(n: int, device: torch.device, side: int = 32, k: int = 10) -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    centers = torch.rand(k, 3, side, side, generator=gen)
    x = centers[y] + 0.5 * torch.randn(n, 3, side, side, generator=gen)
    x, y = x.to(device), y.to(device)
    return DataBundle(x, y, x[:k], y[:k], k, (3, side, side), "cifar-shaped")


def rows(model, data: DataBundle, guarded: bool, device: torch.device) -> pd.Series:
    """The metric rows of ``model`` on the training split, indexed by (layer, metric)."""
    kw = {"geodesic_ts": torch.linspace(0, 1, 11, dtype=torch.float64), "batch": 500}
    if guarded:  # what the training and measure jobs do
        cache = metric_cache_bytes(model, data, "train", 2**30, device)
        with full_float32():
            table, _ = collapse_table(
                model, data, "train", data.num_classes, cache_bytes=cache, **kw
            )
    else:
        table, _ = collapse_table(model, data, "train", data.num_classes, cache_bytes=2**30, **kw)
    return table.set_index(["layer", "metric"])["value"].sort_index()


def max_rel_diff(a: pd.Series, b: pd.Series) -> float:
    """max |a-b| / max(|a|, |b|) over the rows (both NaN: equal; an absolute floor of 1e-12)."""
    a, b = a.align(b)
    both_nan = a.isna() & b.isna()
    scale = pd.concat([a.abs(), b.abs()], axis=1).max(axis=1).clip(lower=1e-12)
    rel = ((a - b).abs() / scale).where(~both_nan, 0.0)
    return float(rel.fillna(math.inf).max())


def run_option(
    name: str, data: DataBundle, steps: int, device: torch.device, stages: list[list[int]]
) -> dict:
    opts = TrainConfig(**OPTIONS[name])
    configure_job(opts)
    torch.manual_seed(0)
    model = build_model("conv", data.in_shape, data.num_classes, stages=stages).to(device)
    model = prepare_model(model, opts, device)
    acc = Accelerator(opts, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, data.size("train"), (128,), generator=gen).to(device)
        with acc.autocast():
            loss = torch.nn.functional.cross_entropy(
                model.forward_logits(acc.inputs(data.train_x[idx])), data.train_y[idx]
            )
        acc.step(loss, opt)
    sync()
    seconds = time.perf_counter() - t0
    guarded = rows(model, data, guarded=True, device=device)  # the option's flags still set
    set_tf32(False)
    reference = rows(model, data, guarded=False, device=device)
    scale = acc.scaler.get_scale() if acc.scaler is not None else math.nan
    return {"option": name, "loss": float(loss), "loss_scale": scale, "steps_s": seconds,
            "max_rel_diff": max_rel_diff(guarded, reference)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated subset")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=4000, help="training samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="8x8 images, a tiny net (CPU smoke run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = [o for o in args.options.split(",") if o]
    unknown = sorted(set(names) - set(OPTIONS))
    if unknown:
        p.error(f"--options: unknown {unknown}; allowed: {', '.join(OPTIONS)}")
    data = cifar_shaped(args.n, device, side=8 if args.tiny else 32)
    stages = TINY_STAGES if args.tiny else STAGES
    results = []
    for name in names:
        if name == "fp16" and device.type != "cuda":
            print(f"{name}: skipped (needs CUDA)")
            continue
        results.append(run_option(name, data, args.steps, device, stages))
        print(f"{name}: {results[-1]}", flush=True)
    df = pd.DataFrame(results)
    df["ok"] = (df["max_rel_diff"] <= BOUND) & df["loss"].map(math.isfinite)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    bad = df.loc[~df["ok"], "option"].tolist()
    print(f"OPTIONS {'ok' if not bad else 'FAILED ' + ','.join(bad)}: metric rows of every "
          f"option within {BOUND:g} of full float32 ({len(df)} options)")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
