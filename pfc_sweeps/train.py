"""Training a ResNet with per-layer collapse tracking (paper section IV-A, Fig. 2 and 3).

Every epoch records train loss/accuracy (running means over the epoch's batches), test
loss/accuracy and the learning rate; every ``train.metrics_every`` epochs (and at the last)
the metric engine's full per-layer table on the training set in eval mode, with the
geodesic curves. Rows go to the job's :class:`~pfc_sweeps.results.ResultsSink` and logger.

A checkpoint (model, optimiser, scheduler, RNG states and all rows so far) is written
atomically after every epoch; rerunning the same command in the same directory resumes
from it and, on CPU with a fixed seed, produces exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .accel import Accelerator, prepare_model
from .config import Config, ConfigError
from .data import DataBundle, load_dataset
from .errors import Diverged, PFCError
from .loggers import RunLogger
from .models import build_model
from .results import ResultsSink, print_summary
from .schema import CHECKPOINT_FILE, RESULTS_FILE, atomic_write
from .tracker import CollapseTracker

__all__ = ["Trainer", "collapse_table", "evaluate", "loss_fn", "run_training"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def loss_fn(name: str, logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy, or MSE to one-hot targets: (1/2B) sum_i ||z_i - e_{y_i}||^2."""
    if name == "ce":
        return F.cross_entropy(logits, y)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * (logits - onehot).pow(2).sum(dim=1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss: str, batch: int) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on (x, y)."""
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(y), batch):
        logits = model.forward_logits(x[i : i + batch])
        yb = y[i : i + batch]
        total += float(loss_fn(loss, logits, yb)) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    return total / len(y), correct / len(y)


@torch.no_grad()
def collapse_table(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    geodesic_ts: Tensor | None,
    cache_bytes: int,
    batch: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metric engine over the training set in eval mode: (per-layer table, curves).

    One forward pass when all layers' features fit ``cache_bytes``; two otherwise.
    """
    model.eval()
    tracker = CollapseTracker(
        num_classes,
        geodesic_ts=geodesic_ts,
        cache_bytes=cache_bytes,
        classifier_weight=model.classifier.weight,
        classifier_bias=model.classifier.bias,
    )
    for _ in range(2):
        for i in range(0, len(y), batch):
            _, feats = model(x[i : i + batch])
            tracker.update(feats, y[i : i + batch])
        tracker.end_pass()
        if not tracker.needs_second_pass:
            break
    res = tracker.compute()
    return res.table, res.curves


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, **state: Any) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _rows_to_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _milestones(cfg: Config) -> list[int]:
    return sorted({round(f * cfg.train.epochs) for f in cfg.optim.decay_at})


def _scalar_rows(epoch: int, values: dict[str, tuple[str, float]]) -> list[dict[str, Any]]:
    return [
        {"epoch": epoch, "split": split, "layer": -1, "metric": name, "value": v}
        for name, (split, v) in values.items()
    ]


def _print_final(table: pd.DataFrame, path: Path) -> None:
    rows = table[table["metric"].isin(["pfc1", "pfc2", "pfc3"]) & (table["layer"] >= 0)]
    title = "Per-layer collapse at the last epoch (PFC1 = Tr S_W / Tr S_B, PFC2 = ETF distance, PFC3 = NCC acc):"
    print_summary(rows, ["layer", "rel_pos"], title, path)


class Trainer:
    """The state of one training job, built from the config; one :meth:`run_epoch` per epoch.

    Construction loads the data and builds the model and optimiser; if ``out_dir`` holds a
    checkpoint, the state and the rows so far are restored from it (``start_epoch`` tells
    where training resumes).
    """

    def __init__(self, cfg: Config, out_dir: Path, sink: ResultsSink, logger: RunLogger):
        tr = cfg.train
        self.cfg, self.sink, self.logger = cfg, sink, logger
        self.device = resolve_device(tr.device)
        if tr.num_threads:
            torch.set_num_threads(tr.num_threads)
        torch.manual_seed(cfg.seed)
        d, g = cfg.dataset, cfg.gaussian
        try:
            self.data: DataBundle = load_dataset(
                d.name,
                root=d.root,
                download=d.download,
                n_per_class=d.subset_per_class,
                seed=cfg.seed,
                device=self.device,
                num_classes=g.num_classes,
                dim=g.dim,
                sigma=g.sigma,
                n=g.n_per_class,
                n_test=g.n_test_per_class,
            )
        except ValueError as e:  # the subset is checked against the data as soon as it loads
            if d.subset_per_class is None or "n_per_class" not in str(e):
                raise
            raise ConfigError(f"dataset.subset_per_class={d.subset_per_class}: {e}") from None
        a = cfg.arch
        shape = {"width": a.width, "blocks": a.blocks} if a.kind == "fc" else {"stages": a.stages}
        self.model = build_model(
            a.kind, self.data.in_shape, self.data.num_classes, block=a.block, **shape
        ).to(self.device)
        self.model = prepare_model(self.model, tr, self.device)
        self.accel = Accelerator(tr, self.device)
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        self.sched = torch.optim.lr_scheduler.MultiStepLR(
            self.opt, milestones=_milestones(cfg), gamma=cfg.optim.gamma
        )
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.ts = (
            torch.linspace(0, 1, tr.geodesic_points, dtype=torch.float64)
            if tr.geodesic_points
            else None
        )
        self.cache_bytes = int(tr.cache_gb * 2**30)
        self.ckpt_path = out_dir / CHECKPOINT_FILE
        self.start_epoch = 1
        self.last_table: pd.DataFrame | None = None
        if self.ckpt_path.exists():
            self._restore()

    def _restore(self) -> None:
        try:
            state = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        except Exception as e:  # torch raises many types for a truncated or foreign file
            raise PFCError(
                f"{self.ckpt_path} is corrupt or unreadable ({type(e).__name__}); delete it and "
                f"{RESULTS_FILE} to start the job over, or use a new hydra.run.dir"
            ) from None
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.shuffle.set_state(state["shuffle"])
        _set_rng_state(state["rng"])
        self.sink.load_rows(
            pd.read_parquet(io.BytesIO(state["rows"])), pd.read_parquet(io.BytesIO(state["curves"]))
        )
        self.start_epoch = state["epoch"] + 1
        if self.start_epoch > self.cfg.train.epochs:
            print(f"{self.ckpt_path} has all {self.cfg.train.epochs} epochs; finishing the job.")
            rows = self.sink.frame()
            last = rows[(rows["epoch"] == rows["epoch"].max()) & (rows["layer"] >= 0)]
            self.last_table = last if len(last) else None
            return
        print(
            f"Resuming from {self.ckpt_path} at epoch {self.start_epoch} of {self.cfg.train.epochs}."
        )

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass of SGD over the shuffled training set; (mean loss, accuracy)."""
        data, tr = self.data, self.cfg.train
        n = len(data.train_y)
        self.model.train()
        perm = torch.randperm(n, generator=self.shuffle).to(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for idx in perm.split(tr.batch_size):
            xb, yb = self.accel.inputs(data.train_x[idx]), data.train_y[idx]
            with self.accel.autocast():
                logits = self.model.forward_logits(xb)
                loss = loss_fn(self.cfg.loss.name, logits, yb)
            self.accel.step(loss, self.opt)
            loss_sum += loss.detach().double() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
        self.sched.step()
        return float(loss_sum) / n, int(correct) / n

    def run_epoch(self, epoch: int) -> pd.DataFrame:
        """Train one epoch, measure, record the rows, checkpoint; returns the epoch's rows."""
        cfg, tr, data = self.cfg, self.cfg.train, self.data
        lr = self.opt.param_groups[0]["lr"]
        train_loss, train_acc = self._train_epoch(epoch)
        if not math.isfinite(train_loss):  # checked once per epoch: no GPU sync per batch
            raise Diverged(
                f"training diverged at epoch {epoch}: loss={train_loss} (optim.lr={lr}); "
                "lower optim.lr"
            )
        test_loss, test_acc = evaluate(
            self.model, data.test_x, data.test_y, cfg.loss.name, tr.eval_batch_size
        )
        scalars = {
            "train_loss": ("train", train_loss),
            "train_acc": ("train", train_acc),
            "test_loss": ("test", test_loss),
            "test_acc": ("test", test_acc),
            "lr": ("train", lr),
        }
        rows = pd.DataFrame(_scalar_rows(epoch, scalars))
        last = epoch == tr.epochs
        if last or epoch % tr.metrics_every == 0:
            table, curves = collapse_table(
                self.model,
                data.train_x,
                data.train_y,
                data.num_classes,
                geodesic_ts=self.ts if (last or tr.geodesic_every_metrics) else None,
                cache_bytes=self.cache_bytes,
                batch=tr.eval_batch_size,
            )
            table = table.assign(epoch=epoch, split="train")
            rows = pd.concat([rows, table], ignore_index=True)
            self.sink.add_curves(curves, epoch=epoch)
            self.last_table = table
        self.sink.add(rows)
        self.logger.log_rows(rows, step=epoch)
        _save_checkpoint(
            self.ckpt_path,
            epoch=epoch,
            model=self.model.state_dict(),
            optim=self.opt.state_dict(),
            sched=self.sched.state_dict(),
            shuffle=self.shuffle.get_state(),
            rng=_rng_state(),
            rows=_rows_to_bytes(self.sink.frame()),
            curves=_rows_to_bytes(self.sink.curves_frame()),
        )
        self.sink.write("running")
        return rows


def run_training(cfg: Config, out_dir: Path, sink: ResultsSink, logger: RunLogger) -> None:
    """Train (or resume) the configured ResNet in ``out_dir``; raises Diverged on NaN/inf.

    Progress: a tqdm bar (epochs, with loss and accuracy) on a terminal, a log line per
    epoch otherwise.
    """
    epochs = cfg.train.epochs
    trainer = Trainer(cfg, out_dir, sink, logger)
    bar = None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(
            total=epochs,
            initial=trainer.start_epoch - 1,
            desc=f"train {cfg.dataset.name}",
            unit="epoch",
        )
    for epoch in range(trainer.start_epoch, epochs + 1):
        t0 = time.perf_counter()
        rows = trainer.run_epoch(epoch)
        v = rows[rows["layer"] == -1].set_index("metric")["value"]
        msg = f"loss={v['train_loss']:.4f} acc={v['train_acc']:.4f} test_acc={v['test_acc']:.4f}"
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)
        else:
            log.info(
                f"epoch {epoch}/{epochs} {msg} lr={v['lr']:.3g} ({time.perf_counter() - t0:.2f}s)"
            )
    if bar is not None:
        bar.close()
    if trainer.last_table is not None:
        _print_final(trainer.last_table, sink.path)
