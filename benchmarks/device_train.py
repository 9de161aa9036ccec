"""A few epochs of a paper recipe on data of its shape, timed as a job runs them.

``--recipe mnist``: Table I's MNIST net (FC ResNet, width 1000, 10 blocks), batch 128, lr
0.005, on a class-structured Gaussian mixture of shape (N, 1, 28, 28), 10 classes.
``--recipe cifar100``: Table I's CIFAR-100 net (conv ResNet, stages 64x32x32 x3, 128x16x16
x3, 256x8x8 x4, 512x4x4 x4), batch 128, lr 0.01, on (N, 3, 32, 32) data, 100 classes.
SGD with momentum 0.9 and weight decay 5e-4; no download. The job's numerics are set as a
job sets them (``configure_job``: ``train.deterministic`` on unless --no-deterministic, TF32
per --tf32). Every epoch: train, then the metric pass the jobs run (all layers, NC1-4, the
101-t geodesic curves; the cache decided first by ``metric_cache_bytes`` from --cache-gb,
the forward inside ``full_float32``) on the training set. Prints per epoch the epoch time,
the metric-pass time, whether the features were cached and the peak GPU memory; on CUDA
the last epoch runs under ``torch.cuda.set_sync_debug_mode("warn")`` and the host-device
syncs of its training loop and metric pass are counted. --compare-deterministic times one
more epoch with the deterministic flags off (the cost of ``train.deterministic``). Ends
with one SUMMARY line.

    python benchmarks/device_train.py --recipe cifar100 --epochs 2 --n 50000
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch

from pfc_sweeps.choices import TRAIN_PRECISIONS
from pfc_sweeps.collapse.network import collapse_table
from pfc_sweeps.config import TrainConfig
from pfc_sweeps.data.bundles import DataBundle
from pfc_sweeps.jobs.accel import (
    Accelerator,
    configure_job,
    full_float32,
    metric_cache_bytes,
    prepare_model,
)
from pfc_sweeps.nets.resnets import build_model
from pfc_sweeps.results.schema import PFC3

RECIPES = {
    "mnist": {"in_shape": (1, 28, 28), "k": 10, "lr": 0.005, "n": 60000,
              "net": {"kind": "fc", "width": 1000, "blocks": 10}},
    "cifar100": {"in_shape": (3, 32, 32), "k": 100, "lr": 0.01, "n": 50000,
                 "net": {"kind": "conv",
                         "stages": [[64, 32, 3], [128, 16, 3], [256, 8, 4], [512, 4, 4]]}},
}  # fmt: skip


def synthetic(n: int, in_shape: tuple[int, ...], k: int, device: torch.device) -> DataBundle:
    """Class-structured data of the recipe's shape, made on the CPU and moved once."""
    gen = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    centers = torch.rand(k, *in_shape, generator=gen)
    x = (centers[y] + 0.5 * torch.randn(n, *in_shape, generator=gen)).clamp_(0, 1)
    x, y = x.to(device), y.to(device)
    return DataBundle(x, y, x[:k], y[:k], k, in_shape, "synthetic")


@contextlib.contextmanager
def count_syncs(device: torch.device, counts: dict[str, int], key: str):
    """Count the host-device syncs inside (CUDA's sync debug mode "warn"; none on a CPU)."""
    if device.type != "cuda":
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts[key] = sum("synchroniz" in str(w.message) for w in caught)


def metric_pass(model, data: DataBundle, budget: int, device: torch.device) -> tuple[float, bool]:
    """The jobs' metric pass over the training set: (last-layer NCC accuracy, cached)."""
    cache = metric_cache_bytes(model, data, "train", budget, device)
    with full_float32():
        table, _ = collapse_table(
            model, data, "train", data.num_classes,
            geodesic_ts=torch.linspace(0, 1, 101, dtype=torch.float64), cache_bytes=cache,
            batch=1000,
        )  # fmt: skip
    pfc3 = table[(table.metric == PFC3) & (table.layer == table.layer.max())].value
    return float(pfc3.iloc[0]), cache > 0


def train_epoch(model, acc: Accelerator, opt, data: DataBundle, gen, batch: int = 128):
    model.train()
    device = data.train_x.device
    for idx in torch.randperm(data.size("train"), generator=gen).to(device).split(batch):
        with acc.autocast():
            logits = model.forward_logits(acc.inputs(data.train_x[idx]))
            loss = torch.nn.functional.cross_entropy(logits, data.train_y[idx])
        acc.step(loss, opt)
    return loss.detach()


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default="mnist", choices=sorted(RECIPES))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n", type=int, default=0, help="training samples (0: the data set's)")
    p.add_argument("--width", type=int, default=0, help="mnist: FC width (0: Table I's)")
    p.add_argument("--blocks", type=int, default=0, help="mnist: FC blocks (0: Table I's)")
    p.add_argument("--precision", default="fp32", choices=TRAIN_PRECISIONS)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    p.add_argument("--compare-deterministic", action="store_true")
    p.add_argument("--cache-gb", type=float, default=8.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device, recipe = torch.device(args.device), RECIPES[args.recipe]
    opts = TrainConfig(precision=args.precision, tf32=args.tf32, compile=args.compile,
                       deterministic=args.deterministic)  # fmt: skip
    configure_job(opts)
    n = args.n or recipe["n"]
    data = synthetic(n, recipe["in_shape"], recipe["k"], device)
    net = dict(recipe["net"])
    if net["kind"] == "fc":
        net["width"], net["blocks"] = args.width or net["width"], args.blocks or net["blocks"]
    torch.manual_seed(0)
    model = build_model(net.pop("kind"), recipe["in_shape"], recipe["k"], **net).to(device)
    model = prepare_model(model, opts, device)
    acc = Accelerator(opts, device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, syncs = [], {}
    for epoch in range(1, args.epochs + 1):
        last = epoch == args.epochs
        sync()
        t0 = time.perf_counter()
        with count_syncs(device, syncs, "train") if last else contextlib.nullcontext():
            loss = train_epoch(model, acc, opt, data, gen)
            sync()
        t1 = time.perf_counter()
        with count_syncs(device, syncs, "metric") if last else contextlib.nullcontext():
            ncc_acc, cached = metric_pass(model, data, int(args.cache_gb * 2**30), device)
            sync()
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        rows.append((t1 - t0, t2 - t1, peak))
        print(f"epoch {epoch}: train {t1 - t0:.2f}s, metric pass {t2 - t1:.2f}s "
              f"({(t2 - t1) / (t1 - t0):.2f}x the epoch, {'cached' if cached else 'two passes'}), "
              f"loss {float(loss):.4f}, last-layer NCC acc {ncc_acc:.4f}, "
              f"peak GPU memory {peak:.2f} GiB", flush=True)  # fmt: skip
    extra = ""
    if syncs:
        batches = -(-n // 128)
        extra += f", syncs: train {syncs['train']} ({batches} batches), metric {syncs['metric']}"
    if args.compare_deterministic:
        configure_job(TrainConfig(tf32=args.tf32, deterministic=not args.deterministic))
        sync()
        t0 = time.perf_counter()
        train_epoch(model, acc, opt, data, gen)
        sync()
        other = time.perf_counter() - t0
        det, nondet = (rows[-1][0], other) if args.deterministic else (other, rows[-1][0])
        extra += f", deterministic / not: {det:.2f}s / {nondet:.2f}s = {det / nondet:.2f}x"
    last = rows[-1]
    print(f"SUMMARY {args.recipe}-recipe N={n} {args.precision}: epoch {last[0]:.2f}s, metric "
          f"pass {last[1]:.2f}s, peak GPU memory {max(r[2] for r in rows):.2f} GiB{extra}")  # fmt: skip


if __name__ == "__main__":
    main()
