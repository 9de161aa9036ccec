"""A few epochs of the paper's MNIST recipe on MNIST-shaped synthetic data, timed.

Table I's MNIST architecture (FC ResNet, width 1000, 10 blocks), SGD with momentum 0.9,
weight decay 5e-4, batch 128, lr 0.005, on a class-structured Gaussian mixture of shape
(N, 1, 28, 28) with 10 classes (no download). Every epoch: train, then the full metric pass
(all layers, NC1-4, the 101-t geodesic curves) on the training set. Prints per epoch the
epoch time, the metric-pass time and the peak GPU memory, and a closing summary line.

    python benchmarks/device_train.py --epochs 3 --n 60000 [--precision bf16 --tf32]
"""

from __future__ import annotations

import argparse
import time

import torch

from pfc_sweeps.choices import TRAIN_PRECISIONS
from pfc_sweeps.collapse.tracker import CollapseTracker
from pfc_sweeps.config import TrainConfig
from pfc_sweeps.jobs.accel import Accelerator, prepare_model
from pfc_sweeps.nets.resnets import build_model
from pfc_sweeps.results.schema import PFC3


def mnist_shaped(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=gen)]
    centers = torch.rand(10, 1, 28, 28, generator=gen)
    x = (centers[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=gen)).clamp_(0, 1)
    return x.to(device), y.to(device)


@torch.no_grad()
def metric_pass(model, x, y, batch: int) -> float:
    """The tracker over (x, y) in eval mode (one forward when the cache fits, else two)."""
    model.eval()
    tr = CollapseTracker(
        10,
        geodesic_ts=torch.linspace(0, 1, 101),
        cache_bytes=8 * 2**30,
        classifier_weight=model.classifier.weight,
        classifier_bias=model.classifier.bias,
    )
    for _ in range(2):
        for s in range(0, len(y), batch):
            tr.update(model(x[s : s + batch])[1], y[s : s + batch])
        tr.end_pass()
        if not tr.needs_second_pass:
            break
    table = tr.compute().table
    return float(table[(table.metric == PFC3) & (table.layer == table.layer.max())].value.iloc[0])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n", type=int, default=60000, help="training samples (MNIST: 60000)")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--precision", default="fp32", choices=TRAIN_PRECISIONS)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    opts = TrainConfig(precision=args.precision, tf32=args.tf32, compile=args.compile)
    x, y = mnist_shaped(args.n, device)
    torch.manual_seed(0)
    model = build_model("fc", (1, 28, 28), 10, width=args.width, blocks=args.blocks).to(device)
    model = prepare_model(model, opts, device)
    acc = Accelerator(opts, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        sync()
        t0 = time.perf_counter()
        for idx in torch.randperm(args.n, generator=gen).to(device).split(128):
            with acc.autocast():
                loss = torch.nn.functional.cross_entropy(model.forward_logits(x[idx]), y[idx])
            acc.step(loss, opt)
        sync()
        t1 = time.perf_counter()
        ncc_acc = metric_pass(model, x, y, 1000)
        sync()
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        rows.append((t1 - t0, t2 - t1, peak))
        print(f"epoch {epoch}: train {t1 - t0:.2f}s, metric pass {t2 - t1:.2f}s "
              f"({(t2 - t1) / (t1 - t0):.2f}x the epoch), loss {float(loss):.4f}, "
              f"last-layer NCC acc {ncc_acc:.4f}, peak GPU memory {peak:.2f} GiB")  # fmt: skip
    last = rows[-1]
    print(f"SUMMARY mnist-recipe N={args.n} {args.precision}: epoch {last[0]:.2f}s, metric pass "
          f"{last[1]:.2f}s, peak GPU memory {max(r[2] for r in rows):.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
