"""Hydra callbacks (``hydra.callbacks`` in ``conf/config.yaml``) around the jobs.

:class:`SweepReport` checks the run or sweep dir before Hydra creates anything in it (a dir
that is a file, or unwritable, is one line instead of a traceback), and at the end of a
``-m`` sweep lists every failed job with its one-line error and its dir, then exits
non-zero. The jobs record their errors in ``<sweep dir>/.errors/<job num>.txt``
(:func:`pfc_sweeps.jobs.dispatch.main`), which works for every launcher: in-process (basic),
subprocesses (``local``) and SLURM jobs on a shared file system.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pfc_sweeps.jobs.jobdir import JobDirError, check_usable_dir
from pfc_sweeps.results.schema import SWEEP_ERRORS_DIR

__all__ = ["SweepReport", "sweep_failures"]


def _check(path: Path) -> None:
    try:
        check_usable_dir(path)
    except JobDirError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def sweep_failures(sweep_dir: Path) -> list[tuple[str, str]]:
    """(job dir, one-line error) of every job of the last ``-m`` run that failed."""
    folder = Path(sweep_dir) / SWEEP_ERRORS_DIR
    out = []
    entries = folder.glob("*.txt") if folder.is_dir() else []
    for f in sorted(entries, key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        job_dir, _, line = f.read_text().partition("\n")
        out.append((job_dir, line.strip()))
    return out


class SweepReport(Callback):
    """Checks the output dir before Hydra uses it; names every failed job of a sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check(Path(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _check(sweep_dir)
        shutil.rmtree(sweep_dir / SWEEP_ERRORS_DIR, ignore_errors=True)  # a new -m run

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = sweep_failures(Path(config.hydra.sweep.dir))
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
            for job_dir, line in failed:
                print(f"  {job_dir}: {line}", file=sys.stderr)
            raise SystemExit(1)
