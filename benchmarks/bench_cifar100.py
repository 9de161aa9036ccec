"""The paper's CIFAR-100 net (Table I), K=100: a training epoch with and without the metric pass.

Side by side, interleaved (median of --rounds after a warm-up round), on CIFAR-shaped random
images (3x32x32, 100 classes) of --n samples:

- train: one SGD epoch (batch 128, forward + backward + step);
- forward: one eval forward over the training set (the floor of any eval-mode metric pass);
- metrics: the job's metric pass, :func:`pfc_sweeps.collapse.network.collapse_table` over
  the studied layers (512x4x4, 4 blocks + the stage input), all metrics and the 101-t
  geodesic curves, one forward when the features fit the cache.

Prints epoch-with-metrics / epoch-without = (train + metrics) / train, the floor
(train + forward) / train, and the goal: ratio <= floor + 0.05 (issue 18).

    python benchmarks/bench_cifar100.py --n 200 --rounds 1   # minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pfc_sweeps.collapse.network import collapse_table
from pfc_sweeps.nets.resnets import build_model

STAGES = [[64, 32, 3], [128, 16, 3], [256, 8, 4], [512, 4, 4]]  # conf/arch/cifar100.yaml
K = 100


class Data:
    """Split-indexed in-memory data as collapse_table batches it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def size(self, split: str) -> int:
        return len(self.y)

    def batches(self, split, order, batch):
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            yield self.x[idx], self.y[idx]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1000, help="training images")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per variant (median)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=500)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(args.n) % K
    x = torch.randn(K, 3, 32, 32, generator=gen)[y] * 0.5 + torch.randn(
        args.n, 3, 32, 32, generator=gen
    )
    torch.manual_seed(0)
    model = build_model("conv", (3, 32, 32), K, stages=STAGES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data, ts = Data(x, y), torch.linspace(0, 1, 101)
    print(f"CIFAR-100 net (Table I), K={K}, N={args.n}, threads={torch.get_num_threads()}")

    def train() -> None:
        model.train()
        for s in range(0, args.n, args.batch):
            logits = model.forward_logits(x[s : s + args.batch])
            loss = torch.nn.functional.cross_entropy(logits, y[s : s + args.batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        for s in range(0, args.n, args.eval_batch):
            model(x[s : s + args.eval_batch])

    def metrics() -> None:
        collapse_table(
            model, data, "train", K, geodesic_ts=ts, cache_bytes=2**31, batch=args.eval_batch
        )

    times: dict[str, list[float]] = {"train": [], "forward": [], "metrics": []}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, fn in (("train", train), ("forward", forward), ("metrics", metrics)):
            t0 = time.perf_counter()
            fn()
            if rnd > 0:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>8}: {v:.3f} s (rounds: {', '.join(f'{t:.2f}' for t in times[k])})")
    ratio = (med["train"] + med["metrics"]) / med["train"]
    floor = (med["train"] + med["forward"]) / med["train"]
    print(f"epoch with metrics / without: {ratio:.3f}")
    print(f"floor (train + eval forward) / train: {floor:.3f}; goal <= floor + 0.05 = "
          f"{floor + 0.05:.3f}: {'met' if ratio <= floor + 0.05 else 'MISSED'}")  # fmt: skip
    print(f"metric pass / eval forward: {med['metrics'] / med['forward']:.3f}")


if __name__ == "__main__":
    main()
