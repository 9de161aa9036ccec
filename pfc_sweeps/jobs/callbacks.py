"""Hydra callbacks (``hydra.callbacks`` in ``conf/config.yaml``) around the jobs.

:class:`SweepReport` checks the run or sweep dir before Hydra creates anything in it (a dir
that is a file, or unwritable, is one line instead of a traceback). For a ``-m`` sweep it
then takes the sweep dir in the submitting process, before any job and before ``sbatch``
(:mod:`pfc_sweeps.jobs.sweepdir`: the sweep lock, the sweep record, an invocation id for
the jobs), and at the end lists every failed job *of this invocation* with its one-line
error and its dir, then exits non-zero. The jobs record their errors in
``<sweep dir>/.errors/<invocation id>/<job num>.txt`` (:func:`pfc_sweeps.jobs.dispatch.main`),
which works for every launcher: in-process (basic), subprocesses (``local``) and SLURM jobs
on a shared file system.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pfc_sweeps.jobs.jobdir import JobDirError, check_usable_dir
from pfc_sweeps.jobs.sweepdir import (
    INVOCATION_ENV,
    SweepLock,
    check_orphans,
    check_record,
    has_results,
    invocation_failures,
    new_invocation_id,
    remove_other_invocations,
    sweep_axes,
    write_record,
)
from pfc_sweeps.results.schema import SWEEP_RECORD_FILE

__all__ = ["SweepReport", "sweep_failures"]

log = logging.getLogger(__name__)


def _fail(e: JobDirError) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


def sweep_failures(sweep_dir: Path, invocation: str) -> list[tuple[str, str]]:
    """(job dir, one-line error) of every job of the invocation ``invocation`` that failed."""
    return invocation_failures(sweep_dir, invocation)


def _axes(config: DictConfig):
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return sweep_axes([str(t) for t in task], params, sweeper)  # type: ignore[arg-type]


class SweepReport(Callback):
    """Checks the output dir before Hydra uses it; holds a sweep's dir; names its failures."""

    def __init__(self) -> None:
        self.lock: SweepLock | None = None
        self.invocation = ""
        self.recorded = False  # this invocation wrote sweep.json for a new (or replaced) sweep

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_usable_dir(Path(config.hydra.run.dir))
        except JobDirError as e:
            _fail(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            check_usable_dir(sweep_dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            self.lock = SweepLock(sweep_dir).acquire()
            check_orphans(sweep_dir, self.lock.previous)
            axes = _axes(config)
            verdict = check_record(sweep_dir, axes)
        except JobDirError as e:
            self._release()
            _fail(e)
        self.invocation = new_invocation_id()
        self.lock.claim(self.invocation)
        os.environ[INVOCATION_ENV] = self.invocation  # inherited by every job, SLURM ones too
        if verdict != "same":
            write_record(sweep_dir, axes, self.invocation)
        self.recorded = verdict in ("new", "replaces")
        if verdict in ("extends", "replaces"):
            log.info(f"{sweep_dir}: this sweep {verdict} the recorded one")
        remove_other_invocations(sweep_dir, self.invocation)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            failed = sweep_failures(sweep_dir, self.invocation)
            if self.recorded and not has_results(sweep_dir):  # every job failed early:
                (sweep_dir / SWEEP_RECORD_FILE).unlink(missing_ok=True)  # leave no record
        finally:
            self._release()
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
            for job_dir, line in failed:
                print(f"  {job_dir}: {line}", file=sys.stderr)
            raise SystemExit(1)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        os.environ.pop(INVOCATION_ENV, None)
