"""Training a network with per-layer collapse tracking (paper section IV-A, Fig. 2 and 3).

Every epoch records train loss/accuracy (running means over the epoch's batches), test
loss/accuracy and the learning rate; every ``train.metrics_every`` epochs (and at the last)
the metric engine's full per-layer table on the training set in eval mode, with the
geodesic curves (:func:`pfc_sweeps.collapse.network.collapse_table`). Rows go to the job's
:class:`~pfc_sweeps.results.sink.ResultsSink` and logger.

A checkpoint (model, optimiser, scheduler, RNG states and all rows so far) is written
atomically after every epoch, by a background thread while the next epoch runs
(:class:`~pfc_sweeps.jobs.checkpoint.CheckpointWriter`); rerunning the same command in the same directory resumes
from it and, on CPU with a fixed seed, produces exactly the rows of an uninterrupted run.
The batches are drawn by index from one seeded generator whether the data are in memory
or streamed (``train.data_gb``), so both paths see the same batches.
"""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfc_sweeps.collapse.allocator import retain_freed_memory
from pfc_sweeps.collapse.network import Data, collapse_table
from pfc_sweeps.config import Config
from pfc_sweeps.errors import Diverged, PFCError
from pfc_sweeps.jobs import ddp, distributed
from pfc_sweeps.jobs.accel import (
    Accelerator,
    configure_job,
    full_float32,
    metric_cache_bytes,
    prepare_model,
)
from pfc_sweeps.jobs.build import build_data, build_net, resolve_device
from pfc_sweeps.jobs.checkpoint import CheckpointWriter, restore_rng_state, rng_state
from pfc_sweeps.jobs.measure import geodesic_ts, metric_errors, print_final, record_metrics
from pfc_sweeps.results.loggers import RunLogger
from pfc_sweeps.results.schema import (
    CHECKPOINT_FILE,
    LR,
    RESULTS_FILE,
    RUN_LAYER,
    TEST_ACC,
    TEST_LOSS,
    TRAIN_ACC,
    TRAIN_LOSS,
)
from pfc_sweeps.results.sink import ResultsSink

__all__ = ["Trainer", "evaluate", "loss_fn", "run_training"]

log = logging.getLogger(__name__)


def loss_fn(name: str, logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy, or MSE to one-hot targets: (1/2B) sum_i ||z_i - e_{y_i}||^2."""
    if name == "ce":
        return F.cross_entropy(logits, y)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * (logits - onehot).pow(2).sum(dim=1).mean()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Data, split: str, loss: str, batch: int
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on ``split`` of ``data``."""
    model.eval()
    n = data.size(split)
    total, correct = 0.0, 0
    for xb, yb in data.batches(split, torch.arange(n), batch):
        logits = model.forward_logits(xb)
        total += float(loss_fn(loss, logits, yb)) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
    total, correct = distributed.all_reduce_sum(total, correct)  # several ranks: their shards
    return total / n, correct / n


def _rows_to_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _milestones(cfg: Config) -> list[int]:
    return sorted({round(f * cfg.train.epochs) for f in cfg.optim.decay_at})


def _scalar_rows(epoch: int, values: dict[str, tuple[str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"epoch": epoch, "split": split, "layer": RUN_LAYER, "metric": name, "value": v}
            for name, (split, v) in values.items()
        ]
    )


def _optimiser(cfg: Config, model: nn.Module):
    """SGD with momentum and weight decay, and its step-decay schedule."""
    o = cfg.optim
    opt = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestones(cfg), gamma=o.gamma)
    return opt, sched


class Trainer:
    """The state of one training job, built from the config; one :meth:`run_epoch` per epoch.

    Construction seeds, loads the data, builds the model and optimiser and, if ``out_dir``
    holds a checkpoint, restores the state and the rows so far (``start_epoch`` tells where
    training resumes).
    """

    def __init__(self, cfg: Config, out_dir: Path, sink: ResultsSink, logger: RunLogger):
        tr = cfg.train
        configure_job(tr)  # TF32 and determinism flags, before CUDA initialises
        self.cfg, self.sink, self.logger = cfg, sink, logger
        self.device = resolve_device(tr.device)
        if self.device.type == "cpu":  # the metric pass's feature cache reuses its pages
            retain_freed_memory()
        if tr.num_threads:
            torch.set_num_threads(tr.num_threads)
        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg, self.device)
        self.model = build_net(cfg.arch, self.data.in_shape, self.data.num_classes)
        self.model.to(self.device)
        self.model = ddp.sync_batchnorm(self.model, tr)  # several ranks (DDP)
        self.model = prepare_model(self.model, tr, self.device)
        self.forward = ddp.training_forward(
            self.model, self.device, unused=cfg.arch.kind == "module"
        )
        self.eval_data = ddp.shard(self.data)  # this rank's part of each pass
        ddp.check_shard_sizes(self.data.size("train"), tr.batch_size)
        self.accel = Accelerator(tr, self.device)
        self.opt, self.sched = _optimiser(cfg, self.model)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.ts = geodesic_ts(tr)
        self.cache_bytes = int(tr.cache_gb * 2**30)
        self.ckpt_path = out_dir / CHECKPOINT_FILE
        self.writer = CheckpointWriter()  # writes each epoch's checkpoint in the background
        self.start_epoch = 1
        self.last_table: pd.DataFrame | None = None
        if self.ckpt_path.exists():
            self._restore()

    def _restore(self) -> None:
        try:
            # on the CPU: load_state_dict places the tensors; RNG states must stay CPU ByteTensors
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch raises many types for a truncated or foreign file
            raise PFCError(
                f"{self.ckpt_path} is corrupt or unreadable ({type(e).__name__}); delete it and "
                f"{RESULTS_FILE} to start the job over, or use a new hydra.run.dir"
            ) from None
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.accel.load_state_dict(state.get("accel", {}))  # fp16: the loss scale
        self.shuffle.set_state(state["shuffle"])
        restore_rng_state(state["rng"], self.device)
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

    def _save(self, epoch: int) -> None:
        if not distributed.is_main():
            return  # rank 0 writes the checkpoint
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "accel": self.accel.state_dict(),
            "shuffle": self.shuffle.get_state(),
            "rng": rng_state(self.device),
            "rows": _rows_to_bytes(self.sink.frame()),
            "curves": _rows_to_bytes(self.sink.curves_frame()),
        }
        self.writer.save(self.ckpt_path, state)

    def close(self) -> None:
        """Wait until the last checkpoint is on disk (re-raising a failed write)."""
        self.writer.close()

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self) -> tuple[float, float]:
        """One pass of SGD over the shuffled training set; (mean loss, accuracy).

        The permutation comes from ``self.shuffle`` (CPU) for both the in-memory and the
        streamed data, so both see the same batches."""
        n = self.data.size("train")
        self.model.train()
        perm = torch.randperm(n, generator=self.shuffle)
        epoch_loss = self.accel.epoch_loss()  # fp16: steps its scaler skips do not count
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for xb, yb, w in ddp.train_batches(self.data, perm, self.cfg.train.batch_size):
            with self.accel.autocast():
                logits = self.forward(self.accel.inputs(xb))
                loss = loss_fn(self.cfg.loss.name, logits, yb)
            self.accel.step(ddp.rescale(loss, w), self.opt)
            epoch_loss.add(loss, len(yb))
            correct += (logits.detach().argmax(1) == yb).sum()
        self.sched.step()
        # the global epoch's (one process: unchanged)
        epoch_loss.total, epoch_loss.count, correct = distributed.all_reduce_sum(
            epoch_loss.total, epoch_loss.count, correct
        )
        return epoch_loss.mean(), int(correct) / n

    def _epoch_scalars(self, epoch: int) -> pd.DataFrame:
        """Train one epoch; its loss/accuracy, the test loss/accuracy and the lr as rows."""
        lr = self.opt.param_groups[0]["lr"]
        train_loss, train_acc = self._train_epoch()
        if not math.isfinite(train_loss):  # checked once per epoch: no GPU sync per batch
            seen = getattr(self.data, "checked", "")  # the inputs are not the cause:
            seen = f"; the inputs were checked {seen} and are finite" if seen else ""
            raise Diverged(
                f"training diverged at epoch {epoch}: loss={train_loss} (optim.lr={lr}{seen}); "
                "lower optim.lr"
            )
        test_loss, test_acc = evaluate(
            self.model, self.eval_data, "test", self.cfg.loss.name, self.cfg.train.eval_batch_size
        )
        scalars = {
            TRAIN_LOSS: ("train", train_loss),
            TRAIN_ACC: ("train", train_acc),
            TEST_LOSS: ("test", test_loss),
            TEST_ACC: ("test", test_acc),
            LR: ("train", lr),
        }
        return _scalar_rows(epoch, scalars)

    def _measure(self, epoch: int) -> pd.DataFrame | None:
        """The metric rows of this epoch on the training set (its curves go to the sink and
        the logger), or None between metric epochs."""
        tr = self.cfg.train
        last = epoch == tr.epochs
        if not (last or epoch % tr.metrics_every == 0):
            return None
        cache = metric_cache_bytes(self.model, self.data, "train", self.cache_bytes, self.device)
        with full_float32(), metric_errors("train"):  # features in float32, whatever the options
            table, curves = collapse_table(
                self.model,
                self.eval_data,
                "train",
                self.data.num_classes,
                geodesic_ts=self.ts if (last or tr.geodesic_every_metrics) else None,
                cache_bytes=cache,
                batch=tr.eval_batch_size,
                precision=tr.metric_precision,  # float64: the exact path
                **ddp.table_kwargs(),
            )
        self.last_table = table
        return record_metrics(self.sink, table, curves, epoch, "train")

    def run_epoch(self, epoch: int) -> pd.DataFrame:
        """Train one epoch, measure, record the rows, checkpoint; returns the epoch's rows."""
        rows = self._epoch_scalars(epoch)
        metrics = self._measure(epoch)
        if metrics is not None:
            rows = pd.concat([rows, metrics], ignore_index=True)
        self.sink.add(rows)
        self.logger.log_rows(rows, step=epoch)
        self._save(epoch)
        self.sink.write("running")
        return rows


def _progress(cfg: Config, start: int):
    """A tqdm bar over the epochs on a terminal, else None (a log line per epoch)."""
    if not sys.stderr.isatty() or not distributed.is_main():
        return None
    from tqdm.auto import tqdm

    desc = f"train {cfg.dataset.name}"
    return tqdm(total=cfg.train.epochs, initial=start - 1, desc=desc, unit="epoch")


def run_training(cfg: Config, out_dir: Path, sink: ResultsSink, logger: RunLogger) -> None:
    """Train (or resume) the configured network in ``out_dir``; raises Diverged on NaN/inf."""
    epochs = cfg.train.epochs
    trainer = Trainer(cfg, out_dir, sink, logger)
    bar = _progress(cfg, trainer.start_epoch)
    try:
        for epoch in range(trainer.start_epoch, epochs + 1):
            t0 = time.perf_counter()
            rows = trainer.run_epoch(epoch)
            v = rows[rows["layer"] == RUN_LAYER].set_index("metric")["value"]
            msg = f"loss={v[TRAIN_LOSS]:.4f} acc={v[TRAIN_ACC]:.4f} test_acc={v[TEST_ACC]:.4f}"
            if bar is not None:
                bar.set_postfix_str(msg)
                bar.update(1)
            else:
                dt = time.perf_counter() - t0
                log.info(f"epoch {epoch}/{epochs} {msg} lr={v[LR]:.3g} ({dt:.2f}s)")
    finally:
        if bar is not None:
            bar.close()
        trainer.close()  # the last checkpoint is on disk before the job is marked done
    if trainer.last_table is not None:
        print_final(trainer.last_table, sink.path)
