"""What ``launch.py`` runs: take the job dir, validate the config, dispatch on ``task.name``.

Order of a job (nothing is written before step 3, no result before the first epoch):

1. lock the job dir (:class:`~pfc_sweeps.jobs.jobdir.JobLock`; a second process stops here);
2. validate the config and compare its fingerprint with the dir's (a rerun with another
   config stops here, with the dir untouched);
3. remove stale temporaries, save the config to ``.hydra/``; a ``done`` dir stops here;
4. run: the job's ``run_id``, fingerprint and W&B run are created with its first results
   (:class:`LazyLogger`), so a job that fails before its first epoch leaves none of them.

Every expected failure ends as one line ``error: ...`` (non-zero exit; the traceback only
with ``HYDRA_FULL_ERROR=1``) and, when the dir is the job's, in ``error.txt``. In a sweep
the job returns normally after recording its error, so that the other jobs run and
:class:`~pfc_sweeps.jobs.callbacks.SweepReport` lists every failure at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pfc_sweeps.config import Config, ConfigError, validate
from pfc_sweeps.errors import Diverged, PFCError
from pfc_sweeps.jobs import distributed
from pfc_sweeps.jobs.jobdir import (
    JobDirError,
    JobLock,
    check_fingerprint,
    fingerprint,
    remove_stale_temps,
    write_error,
    write_fingerprint,
)
from pfc_sweeps.jobs.sweepdir import errors_dir
from pfc_sweeps.results.loggers import RunLogger, make_logger
from pfc_sweeps.results.schema import (
    ERROR_FILE,
    FINGERPRINT_FILE,
    RUN_ID_FILE,
    atomic_write_bytes,
    is_done,
)
from pfc_sweeps.results.sink import ResultsSink

__all__ = ["JobContext", "LazyLogger", "job_context", "main", "run_job"]

log = logging.getLogger(__name__)
HYDRA_SUBDIR = ".hydra"  # where Hydra keeps a job's config (saved here, after the checks)


@dataclass
class JobContext:
    out_dir: Path
    run_id: str
    sweep_id: str
    name: str
    multirun: bool
    config: dict[str, Any]
    committed: bool = field(default=False)

    def commit(self) -> None:
        """Record the dir's config fingerprint and run id: called with the first results."""
        if not self.committed:
            write_fingerprint(self.out_dir, fingerprint(self.config))
            if not (self.out_dir / RUN_ID_FILE).exists():
                atomic_write_bytes(self.out_dir / RUN_ID_FILE, self.run_id.encode())
            self.committed = True


class LazyLogger:
    """A :class:`RunLogger` whose run (e.g. a W&B run) starts at the first rows it logs."""

    def __init__(self, cfg: Config, ctx: JobContext):
        self.cfg, self.ctx = cfg, ctx
        self.inner: RunLogger | None = None

    def _logger(self) -> RunLogger:
        if self.inner is None:
            self.ctx.commit()
            self.inner = make_logger(
                self.cfg.logger,
                run_id=self.ctx.run_id,
                sweep_id=self.ctx.sweep_id,
                task=self.cfg.task.name,
                name=self.ctx.name,
                config=self.ctx.config,
                out_dir=self.ctx.out_dir,
            )
        return self.inner

    def log_rows(self, rows: pd.DataFrame, step: int) -> None:
        self._logger().log_rows(rows, step)

    def log_curves(self, curves: pd.DataFrame, step: int) -> None:
        self._logger().log_curves(curves, step)

    def log_summary(self, table: pd.DataFrame, status: str) -> None:
        self._logger().log_summary(table, status)

    def finish(self, exit_code: int = 0) -> None:
        if self.inner is not None:
            self.inner.finish(exit_code=exit_code)


def _sweep_id(path: Path) -> str:
    """A readable id for the sweep (multirun) or run directory, e.g. ``multirun_2026-11-26_..``."""
    path = path.resolve()
    try:
        parts = path.relative_to(Path.cwd()).parts
    except ValueError:
        parts = path.parts[-2:]
    return "_".join(parts[-3:]) or path.name


def job_context(cfg: DictConfig) -> JobContext:
    """Where this job writes, and the ids that tie its rows and its W&B run together."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    rid_file = out_dir / RUN_ID_FILE
    run_id = rid_file.read_text().strip() if rid_file.exists() else uuid.uuid4().hex[:12]
    return JobContext(
        out_dir=out_dir,
        run_id=run_id,
        sweep_id=_sweep_id(Path(hc.sweep.dir) if multirun else out_dir),
        name=hc.job.override_dirname or hc.job.name,
        multirun=multirun,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        committed=rid_file.exists(),
    )


def _meta(cfg: Config, ctx: JobContext) -> dict[str, Any]:
    surrogate = cfg.task.name == "surrogate"
    nan = float("nan")
    return {
        "run_id": ctx.run_id,
        "sweep_id": ctx.sweep_id,
        "task": cfg.task.name,
        "dataset": "gaussian" if surrogate else cfg.dataset.name,
        "arch": "+".join(cfg.task.models) if surrogate else cfg.arch.name,
        "loss": cfg.loss.name,
        "seed": cfg.seed,
        "lam": cfg.lam.lam if surrogate else nan,
        "lam_w": cfg.lam.lam_w if surrogate else nan,
    }


def run_job(cfg: Config, ctx: JobContext) -> str:
    """Run one validated job in ``ctx.out_dir`` (locked by the caller); its final status."""
    if is_done(ctx.out_dir):
        print(f"{ctx.out_dir} is done already (delete its 'done' file to rerun); nothing to do.")
        return "done"
    sink = ResultsSink(ctx.out_dir, _meta(cfg, ctx), ctx.config)
    logger = LazyLogger(cfg, ctx)
    try:
        if cfg.task.name == "train":
            from pfc_sweeps.jobs.train import run_training

            run_training(cfg, ctx.out_dir, sink, logger)
        elif cfg.task.name == "measure":
            from pfc_sweeps.jobs.measure import run_measure

            run_measure(cfg, ctx.out_dir, sink, logger)
        else:
            from pfc_sweeps.jobs.surrogate import run_surrogate

            run_surrogate(cfg, sink, logger)
    except Diverged:
        ctx.commit()
        sink.write("diverged")
        logger.log_summary(sink.frame(), "diverged")
        logger.finish(exit_code=1)
        raise
    except BaseException:
        if len(sink.frame()):  # a job that fails after its first results keeps them
            sink.write("failed")
        logger.finish(exit_code=1)
        raise
    ctx.commit()
    sink.finish("done")
    logger.log_summary(sink.frame(), "done")
    logger.finish(exit_code=0)
    return "done"


def _save_hydra_config(cfg: DictConfig, out_dir: Path) -> None:
    """What Hydra's ``output_subdir`` would hold; saved only once the dir is known to be ours."""
    hc = HydraConfig.get()
    sub = out_dir / HYDRA_SUBDIR
    sub.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, sub / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), sub / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, sub / "overrides.yaml")


def _run_locked(cfg: DictConfig, out_dir: Path, lock: JobLock) -> None:
    """Steps 2-4 of the module docstring, with the lock held."""
    typed = validate(cfg)
    ctx = job_context(cfg)
    check_fingerprint(out_dir, fingerprint(ctx.config))
    lock.claim()
    for p in remove_stale_temps(out_dir):
        log.info(f"removed {p.name}, left by an interrupted write")
    (out_dir / ERROR_FILE).unlink(missing_ok=True)
    _save_hydra_config(cfg, out_dir)
    distributed.announce(out_dir, None)  # several ranks: the others start the job now
    run_job(typed, ctx)


def _expected(e: BaseException) -> bool:
    """A failure reported as one line (the data module, and torch, only if already loaded)."""
    data = sys.modules.get("pfc_sweeps.data.bundles")
    return isinstance(e, (ConfigError, PFCError)) or (
        data is not None and isinstance(e, data.DatasetNotFound)
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _record(line: str, out_dir: Path, owned: bool) -> None:
    """Write a failed job's line to its dir (if ours) and, in a sweep, for the sweep's report."""
    hc = HydraConfig.get()
    if owned and (hc.mode == RunMode.MULTIRUN or (out_dir / FINGERPRINT_FILE).exists()):
        write_error(out_dir, line)  # a single run that never produced results leaves nothing
    if hc.mode == RunMode.MULTIRUN:
        entry = errors_dir(Path(hc.sweep.dir)) / f"{hc.job.num}.txt"  # this invocation's
        atomic_write_bytes(entry, f"{out_dir}\n{line}\n".encode())


def main(cfg: DictConfig) -> None:
    """Hydra task function: lock the job dir, validate, run; one line per expected failure.

    Under a multi-process launch (:mod:`pfc_sweeps.jobs.distributed`) rank 0 does all of
    this and the other ranks run :func:`_run_worker`.
    """
    try:
        group = distributed.join(cfg)
    except PFCError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if group is not None and group.rank != 0:
        _run_worker(cfg)
        return
    distributed.new_job()
    try:
        _main(cfg)
    finally:  # a job that stopped before its start stops the other ranks too
        distributed.announce(Path(HydraConfig.get().runtime.output_dir), "rank 0 stopped")


def _run_worker(cfg: DictConfig) -> None:
    """Ranks 1..: rank 0's job dir and go, then the same work, writing and printing nothing.

    Errors that every rank meets (a bad config, divergence) are rank 0's to report; a lost
    rank, or a failure of this rank alone, is reported here, as one line naming the rank.
    """
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    rank = distributed.current().rank  # type: ignore[union-attr]
    try:
        out_dir, error = distributed.receive()
        if error is None:
            _work(cfg, out_dir)
            return
    except Exception as e:
        e = distributed.translate(e)
        if isinstance(e, distributed.RankLost):
            print(f"error: {e}", file=sys.stderr)
        elif not _expected(e):
            print(f"error: rank {rank}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    if not multirun:
        raise SystemExit(1)


def _work(cfg: DictConfig, out_dir: Path) -> None:
    """One worker rank's share of the job in ``out_dir`` (its rows are kept, not written)."""
    import contextlib

    from pfc_sweeps.results.loggers import NullLogger

    typed = validate(cfg)
    if is_done(out_dir) or typed.task.name not in ("train", "measure"):
        return  # surrogate jobs run on rank 0 alone
    ctx = job_context(cfg)
    sink = _WorkerSink(out_dir, _meta(typed, ctx), ctx.config)
    logging.disable(logging.INFO)  # progress and log lines: rank 0's
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            if typed.task.name == "train":
                from pfc_sweeps.jobs.train import run_training

                run_training(typed, out_dir, sink, NullLogger())
            else:
                from pfc_sweeps.jobs.measure import run_measure

                run_measure(typed, out_dir, sink, NullLogger())
    finally:
        logging.disable(logging.NOTSET)


class _WorkerSink(ResultsSink):
    """A worker rank's sink: it keeps the rows (a checkpoint needs them) and writes nothing."""

    def write(self, status: str = "running") -> Path:
        return self.path

    def finish(self, status: str = "done") -> Path:
        return self.path


def _main(cfg: DictConfig) -> None:
    """:func:`main` of a single process (or rank 0)."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    out_dir = Path(hc.runtime.output_dir)
    owned = False
    try:
        with JobLock(out_dir) as lock:
            owned = True
            try:
                _run_locked(cfg, out_dir, lock)
            except JobDirError:
                owned = False  # the dir holds another config: leave it untouched
                raise
    except Exception as e:
        e = distributed.translate(e)  # a failed collective: one line naming the rank
        expected = _expected(e)
        line = _one_line(e) if expected else f"{type(e).__name__}: {_one_line(e)}"
        owned = owned and not isinstance(e, JobDirError)
        try:
            _record(line, out_dir, owned)
        except OSError:
            pass  # an unwritable dir is the error being reported
        if not multirun and (full or not expected):
            raise  # Hydra prints the traceback
        if full or not expected:
            traceback.print_exc()
        if multirun and owned:
            log.error(f"error: {line}")  # also in the job's log file
            return
        print(f"error: {line}", file=sys.stderr)
        if multirun:
            return  # the other jobs run on; the sweep reports this one at its end
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
