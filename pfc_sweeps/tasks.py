"""What ``launch.py`` runs: validate the config, set up the job, dispatch on ``task.name``.

Every job gets its own output directory (Hydra's), a persistent ``run_id`` there (so a
requeued or resumed job keeps its id and W&B run), a :class:`~pfc_sweeps.results.ResultsSink`
and a logger. A job whose directory already holds ``done`` does nothing and says so.
"""

from __future__ import annotations

import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import Config, ConfigError, validate
from .errors import Diverged, PFCError
from .loggers import RunLogger, make_logger
from .results import ResultsSink
from .schema import RUN_ID_FILE, atomic_write_bytes, is_done

__all__ = ["JobContext", "job_context", "main", "run_job"]

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    out_dir: Path
    run_id: str
    sweep_id: str
    name: str
    multirun: bool
    config: dict[str, Any]


def _sweep_id(path: Path) -> str:
    """A readable id for the sweep (multirun) or run directory, e.g. ``multirun_2026-11-26_..``."""
    path = path.resolve()
    try:
        rel = path.relative_to(Path.cwd())
        parts = rel.parts
    except ValueError:
        parts = path.parts[-2:]
    return "_".join(parts[-3:]) or path.name


def _run_id(out_dir: Path) -> str:
    f = out_dir / RUN_ID_FILE
    if f.exists():
        return f.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    atomic_write_bytes(f, rid.encode())
    return rid


def job_context(cfg: DictConfig) -> JobContext:
    """Where this job writes, and the ids that tie its rows and its W&B run together."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if multirun else out_dir
    name = hc.job.override_dirname or hc.job.name
    return JobContext(
        out_dir=out_dir,
        run_id=_run_id(out_dir),
        sweep_id=_sweep_id(sweep_dir),
        name=name,
        multirun=multirun,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
    )


def _meta(cfg: Config, ctx: JobContext) -> dict[str, Any]:
    surrogate = cfg.task.name not in ("train", "measure")
    nan = float("nan")
    return {
        "run_id": ctx.run_id,
        "sweep_id": ctx.sweep_id,
        "task": cfg.task.name,
        "dataset": "gaussian" if surrogate else cfg.dataset.name,
        "arch": "ufm" if surrogate else cfg.arch.name,
        "loss": cfg.loss.name,
        "seed": cfg.seed,
        "lam": cfg.lam.lam if surrogate else nan,
        "lam_w": cfg.lam.lam_w if surrogate else nan,
    }


def run_job(cfg: Config, ctx: JobContext) -> str:
    """Run one validated job in ``ctx.out_dir``; returns its final status."""
    if is_done(ctx.out_dir):
        print(f"{ctx.out_dir} is done already (delete its 'done' file to rerun); nothing to do.")
        return "done"
    sink = ResultsSink(ctx.out_dir, _meta(cfg, ctx), ctx.config)
    logger: RunLogger = make_logger(
        cfg.logger,
        run_id=ctx.run_id,
        sweep_id=ctx.sweep_id,
        task=cfg.task.name,
        name=ctx.name,
        config=ctx.config,
        out_dir=ctx.out_dir,
    )
    try:
        if cfg.task.name == "train":
            from .train import run_training

            run_training(cfg, ctx.out_dir, sink, logger)
        elif cfg.task.name == "measure":
            from .measure import run_measure

            run_measure(cfg, ctx.out_dir, sink, logger)
        else:
            from .surrogate_task import run_surrogate

            run_surrogate(cfg, sink, logger)
    except Diverged:
        sink.write("diverged")
        logger.log_summary(sink.frame(), "diverged")
        logger.finish(exit_code=1)
        raise
    except BaseException:
        if len(sink.frame()):
            sink.write("failed")
        logger.finish(exit_code=1)
        raise
    sink.finish("done")
    logger.log_summary(sink.frame(), "done")
    logger.finish(exit_code=0)
    return "done"


def main(cfg: DictConfig) -> float | None:
    """Hydra task function: validate (before any work), then run the job.

    In a single run, a known failure (bad config value, missing data set, divergence) is
    printed as one line and the process exits non-zero. In a multirun it is raised, so the
    launcher records the failed job and the sweep reports it after the other jobs ran.
    """
    from .data import DatasetNotFound

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        typed = validate(cfg)
        ctx = job_context(cfg)
        run_job(typed, ctx)
    except (ConfigError, DatasetNotFound, PFCError) as e:
        if multirun:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
    return None
