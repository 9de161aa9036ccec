"""One sweep dir, one sweep (issue 21): the sweep lock, the sweep record, per-invocation errors.

The rules (docs/sweeps.md, "Sweep dirs"), next to the job-dir rules of :mod:`.jobdir`:

1. :class:`SweepLock`: the submitting ``launch.py -m`` holds an exclusive ``flock`` on
   :data:`~pfc_sweeps.results.schema.SWEEP_LOCK_FILE` from before the first job (and before
   ``sbatch``) until its report; a second sweep on the dir stops with one line naming the
   holder. Jobs, requeued SLURM jobs included, never take this lock.
2. :func:`check_record`: the dir records its sweep (:data:`SWEEP_RECORD_FILE`, the axes of
   Hydra's cartesian product). The same sweep resumes; a sweep that only appends jobs (every
   recorded job keeps its number and overrides) extends it; any other sweep is refused with one
   line naming the keys that differ (unless no job of the dir has results yet).
3. :func:`errors_dir`: each invocation of ``launch.py -m`` has an id (:func:`new_invocation_id`,
   passed to its jobs in :data:`INVOCATION_ENV`); a failed job writes its line into
   ``.errors/<invocation id>/``, and the report reads only its own invocation's folder.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from pfc_sweeps.jobs.jobdir import EXCLUDED, JobDirError, JobLock, check_usable_dir
from pfc_sweeps.results.schema import (
    FINGERPRINT_FILE,
    SWEEP_ERRORS_DIR,
    SWEEP_LOCK_FILE,
    SWEEP_RECORD_FILE,
    atomic_write_bytes,
)

__all__ = [
    "BASIC_SWEEPER",
    "INVOCATION_ENV",
    "Axes",
    "SweepDirError",
    "SweepLock",
    "check_orphans",
    "check_record",
    "check_sweep_not_busy",
    "errors_dir",
    "has_results",
    "invocation_failures",
    "jobs_of",
    "new_invocation_id",
    "remove_other_invocations",
    "sweep_axes",
    "write_record",
]

#: Environment variable that carries the invocation id from ``launch.py -m`` to its jobs
#: (inherited by subprocesses and, through ``sbatch``'s default ``--export=ALL``, SLURM jobs).
INVOCATION_ENV = "PFC_SWEEP_INVOCATION"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
#: Hydra's job order: one ``(key, [value, ...])`` per override key, the outermost first.
Axes = list[tuple[str, list[str]]]


class SweepDirError(JobDirError):
    """The sweep dir cannot be used by this sweep (held by another, or records another)."""


def new_invocation_id() -> str:
    """A fresh id for one invocation of ``launch.py -m``, e.g. ``20261205-093012-4242-a1b2c3``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class SweepLock(JobLock):
    """An exclusive ``flock`` on ``<sweep dir>/.sweep.lock``, as :class:`JobLock` for job dirs.

    The holder line is ``host H pid P invocation I`` (and ``slurm_job J`` when the submitter
    itself runs in a SLURM allocation). A second sweep gets a :class:`SweepDirError`.
    """

    def __init__(self, sweep_dir: Path):
        super().__init__(sweep_dir)
        self.path = Path(sweep_dir) / SWEEP_LOCK_FILE
        self.previous = ""  # the holder line a killed submitter left behind

    def acquire(self) -> SweepLock:
        """Take the lock; raise :class:`SweepDirError` naming the holder when it is taken."""
        try:
            super().acquire()
            if not self.owned:  # an existing file: its last holder died without releasing it
                assert self.fd is not None
                self.previous = os.pread(self.fd, 300, 0).decode(errors="replace").strip()
        except JobDirError as e:
            text = str(e)
            mark = "in use by another job ("
            if mark not in text:
                raise
            holder = text[text.index(mark) + len(mark) : text.rindex("); wait")]
            raise SweepDirError(
                f"{self.path.parent} is in use by another sweep ({holder}); wait for it to "
                "end (or stop that process) or use a new hydra.sweep.dir"
            ) from None
        return self

    def claim(self, invocation: str = "") -> None:  # type: ignore[override]
        """Write the holder line (host, pid, invocation id, SLURM job of the submitter)."""
        assert self.fd is not None
        line = f"host {socket.gethostname()} pid {os.getpid()} invocation {invocation or '-'}"
        if os.environ.get("SLURM_JOB_ID"):
            line += f" slurm_job {os.environ['SLURM_JOB_ID']}"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, line.encode(), 0)
        self.owned = True


def check_sweep_not_busy(sweep_dir: Path) -> None:
    """Raise :class:`SweepDirError` if a running sweep holds ``sweep_dir``; changes nothing."""
    try:
        busy = (Path(sweep_dir) / SWEEP_LOCK_FILE).exists()
    except OSError:  # a name the file system refuses: check_usable_dir says so in one line
        check_usable_dir(Path(sweep_dir))
        raise
    if busy:
        SweepLock(sweep_dir).acquire().release()


def _live_slurm_jobs(sweep_dir: Path) -> list[str]:
    """The SLURM jobs submitted for ``sweep_dir`` (its ``.submitit/<id>/``) still in the queue."""
    ids = {p.name for p in (Path(sweep_dir) / ".submitit").glob("*") if p.is_dir()}
    if not ids or shutil.which("squeue") is None:
        return []
    try:
        res = subprocess.run(
            ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    arrays = {i.split("_")[0] for i in ids}
    queued = {line.split("_")[0] for line in res.stdout.split()} if res.returncode == 0 else set()
    return sorted(arrays & queued, key=lambda j: (len(j), j))


def check_orphans(sweep_dir: Path, previous: str) -> None:
    """Raise :class:`SweepDirError` if a dead submitter's SLURM jobs are still queued or running.

    Args:
        sweep_dir: the sweep dir, just locked by this submitter.
        previous: the holder line its dead predecessor left in the lock file ("" if none).

    Raises:
        SweepDirError: one line naming the SLURM job ids and the dead submitter.
    """
    live = _live_slurm_jobs(sweep_dir) if previous else []
    if live:
        raise SweepDirError(
            f"{sweep_dir}: SLURM job(s) {', '.join(live)} of an earlier submission ({previous}, "
            "no longer running) are still queued or running; wait for them to end (squeue) or "
            "scancel them, then rerun"
        )


# ------------------------------------------------------------------------------ the record
def _excluded(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == e or key.startswith(e + ".") for e in EXCLUDED)


def sweep_axes(
    task_overrides: Sequence[str], params: Mapping[str, str] | None = None, sweeper: str = ""
) -> Axes:
    """The axes of the sweep's cartesian product, as Hydra's BasicSweeper orders them.

    ``params`` (``hydra.sweeper.params``) come first, then the command line; a key given twice
    keeps its first place and its last value. Fixed keys of :data:`~.jobdir.EXCLUDED` (how a
    job runs, e.g. ``logger``) are left out: they may change on a resume. With another sweeper,
    or overrides Hydra cannot expand without the config (glob), each override is one axis.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(task_overrides)
    axes: dict[str, list[str]] = {}
    try:
        if sweeper and sweeper != BASIC_SWEEPER:
            raise ValueError(sweeper)
        for ov in OverridesParser.create().parse_overrides(lines):
            key = ov.get_key_element()
            if ov.is_sweep_override():
                axes[key] = [str(v) for v in ov.sweep_string_iterator()]
            else:
                axes[key] = [ov.get_value_element_as_str()]
    except Exception:
        axes = {line: [""] for line in lines}
    return [(k, v) for k, v in axes.items() if len(v) != 1 or not _excluded(k)]


def jobs_of(axes: Axes) -> list[frozenset[str]]:
    """The overrides of every job, in job-number order (Hydra's ``itertools.product``)."""
    lists = [[f"{k}={v}" if v != "" else k for v in values] for k, values in axes]
    return [frozenset(job) for job in itertools.product(*lists)]


def _read_record(path: Path) -> Axes:
    try:
        data = json.loads(path.read_text())
        return [(str(k), [str(v) for v in values]) for k, values in data["axes"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SweepDirError(
            f"{path} is unreadable ({type(e).__name__}); use a new hydra.sweep.dir"
        ) from None


def has_results(sweep_dir: Path) -> bool:
    """Whether any job of ``sweep_dir`` has results (a ``fingerprint.json``)."""
    return any(".submitit" not in p.parts for p in sweep_dir.rglob(FINGERPRINT_FILE))


def _axis(key: str, values: list[str] | None) -> str:
    return f"{key} unset" if values is None else f"{key}={','.join(values)}"


def _difference(sweep_dir: Path, old: Axes, new: Axes) -> str:
    """One line naming what differs between the recorded sweep and this one."""
    old_d, new_d = dict(old), dict(new)
    keys = [k for k, _ in old] + [k for k, _ in new if k not in old_d]
    changed = [k for k in keys if old_d.get(k) != new_d.get(k)]
    parts = [f"{_axis(k, old_d.get(k))} (this sweep: {_axis(k, new_d.get(k))})" for k in changed]
    if not parts:
        swept = [k for k, v in old if len(v) > 1], [k for k, v in new if len(v) > 1]
        parts = [
            f"swept keys in the order {', '.join(swept[0])} (this sweep: "
            f"{', '.join(swept[1])}), which numbers the jobs differently"
        ]
    else:
        olds, news = (
            [set(old_d.get(k) or ()) for k in changed],
            [set(new_d.get(k) or ()) for k in changed],
        )
        if olds == news:
            parts.append("the order of the values numbers the jobs")
        elif all(k in old_d and o <= n for k, o, n in zip(changed, olds, news, strict=True)):
            parts.append(
                "added values keep every job's number only at the end of the first swept key"
            )
    return (
        f"{sweep_dir} holds another sweep: {'; '.join(parts)}; rerun the sweep recorded in "
        f"{SWEEP_RECORD_FILE} to resume it, or use a new hydra.sweep.dir"
    )


def check_record(sweep_dir: Path, axes: Axes) -> str:
    """Whether this sweep may use ``sweep_dir``: ``new``, ``same``, ``extends`` or ``replaces``.

    ``extends``: the recorded jobs are the first jobs of this sweep, each with the same
    overrides. ``replaces``: another sweep, but no job of the dir has results yet.

    Raises:
        SweepDirError: another sweep whose jobs have results (one line naming what differs),
            or an unreadable record.
    """
    path = Path(sweep_dir) / SWEEP_RECORD_FILE
    if not path.exists():
        return "new"
    old = _read_record(path)
    old_jobs, new_jobs = jobs_of(old), jobs_of(axes)
    if new_jobs == old_jobs:
        return "same"
    if len(new_jobs) > len(old_jobs) and new_jobs[: len(old_jobs)] == old_jobs:
        return "extends"
    if not has_results(Path(sweep_dir)):
        return "replaces"
    raise SweepDirError(_difference(Path(sweep_dir), old, axes))


def write_record(sweep_dir: Path, axes: Axes, invocation: str) -> None:
    """Record ``axes`` as the sweep of ``sweep_dir`` (atomically)."""
    lines = ",\n  ".join(json.dumps([k, v]) for k, v in axes)  # one axis a line
    text = f'{{"by": {json.dumps(invocation)}, "jobs": {len(jobs_of(axes))},\n "axes": [\n  {lines}\n]}}\n'
    atomic_write_bytes(Path(sweep_dir) / SWEEP_RECORD_FILE, text.encode())


# ------------------------------------------------------------------ per-invocation errors
def _holder_invocation(sweep_dir: Path) -> str | None:
    try:
        text = (Path(sweep_dir) / SWEEP_LOCK_FILE).read_text()
    except OSError:
        return None
    m = re.search(r"invocation (\S+)", text)
    return m.group(1) if m and m.group(1) != "-" else None


def errors_dir(sweep_dir: Path, invocation: str | None = None) -> Path:
    """``<sweep dir>/.errors/<invocation id>/``: where this invocation's jobs record failures.

    The id is ``invocation``, else :data:`INVOCATION_ENV`, else the one in the sweep lock's
    holder line (a job whose environment was not passed on), else ``unknown``.
    """
    inv = invocation or os.environ.get(INVOCATION_ENV) or _holder_invocation(sweep_dir)
    return Path(sweep_dir) / SWEEP_ERRORS_DIR / (inv or "unknown")


def invocation_failures(sweep_dir: Path, invocation: str) -> list[tuple[str, str]]:
    """(job dir, one-line error) of every failed job of one invocation, by job number."""
    folder = errors_dir(sweep_dir, invocation)
    entries = folder.glob("*.txt") if folder.is_dir() else []
    out = []
    for f in sorted(entries, key=lambda p: int(p.stem) if p.stem.isdigit() else 0):
        job_dir, _, line = f.read_text().partition("\n")
        out.append((job_dir, line.strip()))
    return out


def remove_other_invocations(sweep_dir: Path, invocation: str) -> None:
    """Delete the error records of earlier invocations (called with the sweep lock held)."""
    folder = Path(sweep_dir) / SWEEP_ERRORS_DIR
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.name != invocation:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
