"""One training epoch of our loop against a minimal hand-written PyTorch loop, side by side.

Both train the same model (the MNIST FC ResNet of Table I: width 1000, 10 blocks) on the
same data (an MNIST-sized Gaussian mixture, 784 dimensions, 10 classes) with the same SGD,
and both evaluate the test accuracy once per epoch (the baseline is what a researcher would
write: a DataLoader over a TensorDataset, forward, backward, step, a test pass). Ours also
checkpoints atomically and rewrites the parquet table every epoch.

    python benchmarks/bench_train.py --scale 0.1 --rounds 3

Prints the median time of each variant and the ratios ours / baseline, without metrics and
with the full metric engine every epoch (goals: <= 1.03x and <= 1.15x).

The metric pass runs in eval mode over the whole training set, so it cannot cost less than
one eval forward pass over it. The variant "baseline+forward" (the baseline epoch plus a bare
eval forward over the training set, features discarded) measures that floor side by side.
Our checkpoint is written by a background thread while the next epoch runs; the time that
write still needed after the epoch returned is printed on its own line, not counted in the
epoch (in a run it overlaps the next epoch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from pfc_sweeps.config import Config
from pfc_sweeps.jobs.train import Trainer, loss_fn
from pfc_sweeps.nets.resnets import build_model
from pfc_sweeps.results.loggers import NullLogger
from pfc_sweeps.results.sink import ResultsSink


def make_config(n_per_class: int, metrics: bool, width: int, blocks: int) -> Config:
    cfg = OmegaConf.structured(Config)
    cfg.dataset.name = "gaussian"
    cfg.gaussian.num_classes = 10
    cfg.gaussian.dim = 784
    cfg.gaussian.n_per_class = n_per_class
    cfg.gaussian.n_test_per_class = max(1, n_per_class // 6)  # MNIST: 60k train, 10k test
    cfg.arch.width, cfg.arch.blocks = width, blocks
    cfg.optim.lr = 0.005
    cfg.train.epochs = 1000  # no lr decay inside the measured epochs
    cfg.train.metrics_every = 1 if metrics else 1000
    cfg.train.geodesic_every_metrics = True
    cfg.logger.name = "none"
    return OmegaConf.to_object(cfg)


def baseline_epoch(model, opt, loader, test_x, test_y) -> None:
    model.train()
    for xb, yb in loader:
        loss = torch.nn.functional.cross_entropy(model.forward_logits(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        (model.forward_logits(test_x).argmax(1) == test_y).float().mean().item()


def index_batches(x, y, batch: int = 128):
    """Shuffled batches by indexing tensors on their device: a DataLoader over GPU tensors
    would collate item by item and inflate the baseline (issue 22)."""
    perm = torch.randperm(len(y), device=x.device)
    return [(x[perm[s : s + batch]], y[perm[s : s + batch]]) for s in range(0, len(y), batch)]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work before the clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model, x, batch: int = 1000) -> None:
    """The floor of any eval-mode metric pass: one forward over the training set."""
    model.eval()
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            model(x[s : s + batch])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of MNIST's 60000 samples")
    ap.add_argument("--rounds", type=int, default=3, help="epochs timed per variant (median)")
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=10)
    args = ap.parse_args()
    n_per_class = max(2, round(6000 * args.scale))
    print(f"N={10 * n_per_class} train samples, width={args.width}, blocks={args.blocks}, "
          f"threads={torch.get_num_threads()}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, metrics in [("ours", False), ("ours+metrics", True)]:
            cfg = make_config(n_per_class, metrics, args.width, args.blocks)
            out = Path(tmp) / name
            meta = dict(run_id=name, sweep_id="bench", task="train", dataset="gaussian",
                        arch="fc", loss="ce", seed=0, lam=float("nan"), lam_w=float("nan"))  # fmt: skip
            trainers[name] = Trainer(cfg, out, ResultsSink(out, meta, {}), NullLogger())
        data = trainers["ours"].data
        torch.manual_seed(0)
        model = build_model("fc", data.in_shape, 10, width=args.width, blocks=args.blocks)
        device = data.train_x.device
        model = model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
        if device.type == "cuda":  # re-shuffled each round below
            loader = index_batches(data.train_x, data.train_y)
        else:
            loader = DataLoader(
                TensorDataset(data.train_x, data.train_y), batch_size=128, shuffle=True
            )
        assert loss_fn("ce", torch.zeros(1, 10), torch.zeros(1, dtype=torch.long)) > 0

        names = ["baseline", "ours", "ours+metrics", "baseline+forward"]
        times: dict[str, list[float]] = {k: [] for k in names}
        writes: list[float] = []
        epoch = {"ours": 0, "ours+metrics": 0}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for name in names:  # interleaved, so load changes hit every variant alike
                if device.type == "cuda":
                    loader = index_batches(data.train_x, data.train_y)
                sync(device)
                t0 = time.perf_counter()
                if name.startswith("baseline"):
                    baseline_epoch(model, opt, loader, data.test_x, data.test_y)
                    if name == "baseline+forward":
                        bare_forward(model, data.train_x)
                else:
                    epoch[name] += 1
                    trainers[name].run_epoch(epoch[name])
                sync(device)
                times[name].append(time.perf_counter() - t0)
                if name in trainers:  # the background write must not overlap the next variant
                    t1 = time.perf_counter()
                    trainers[name].writer.wait()
                    writes.append(time.perf_counter() - t1)
        for t in trainers.values():
            t.close()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>16}: {v:.3f} s/epoch (rounds: {', '.join(f'{t:.2f}' for t in times[k][1:])})")
    print(f"checkpoint write still running when the epoch returned: median "
          f"{statistics.median(writes):.3f} s (overlaps the next epoch in a run)")  # fmt: skip
    base, floor = med["baseline"], med["baseline+forward"]
    print(f"ratio ours / baseline (no metrics):          {med['ours'] / base:.3f}  (goal <= 1.03)")
    print(f"ratio ours+metrics / baseline:               {med['ours+metrics'] / base:.3f}  (goal <= 1.15)")  # fmt: skip
    print(f"floor: (baseline + eval forward) / baseline: {floor / base:.3f}")
    print(f"ratio ours+metrics / (baseline + forward):   {med['ours+metrics'] / floor:.3f}")


if __name__ == "__main__":
    main()
