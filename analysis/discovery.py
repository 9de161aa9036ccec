"""Find job folders and tell what state each job is in (for :mod:`analysis.aggregate`).

A sweep leaves one folder per job (Hydra multirun: ``<sweep_dir>/<job_num>/`` next to
``<sweep_dir>/multirun.yaml``), laid out as :mod:`pfc_sweeps.results.schema` says. This module
finds those folders (:func:`find_job_dirs`), counts the jobs a sweep asked for
(:func:`expected_job_count`), and reads one job (:func:`inspect_job`): its tables, its
status, and for a job that did not finish the reason (``error.txt``, the log files).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from pfc_sweeps.results.schema import (
    COLUMNS,
    CURVE_COLUMNS,
    DONE_FILE,
    ERROR_FILE,
    RESULTS_FILE,
    RUN_ID_FILE,
    SWEEP_ERRORS_DIR,
    conform,
    is_done,
    read_curves,
    read_results,
)

__all__ = [
    "JOB_STATES",
    "JobRecord",
    "JobTables",
    "OutputError",
    "SchemaError",
    "check_one_version",
    "check_output",
    "expected_job_count",
    "find_job_dirs",
    "inspect_job",
    "log_hint",
    "normalize_table",
]

#: Hydra's folder in every job folder it starts, and a multirun's sweep file.
HYDRA_DIR, MULTIRUN_FILE = ".hydra", "multirun.yaml"

JOB_STATES = {
    "done": "finished: `done` marker present and a readable metrics.parquet",
    "diverged": "the job reports status diverged (excluded by default)",
    "failed": "the job reports status failed (excluded by default)",
    "unfinished": "no `done` marker; metrics.parquet says running (killed, timed out or still running)",
    "no_results": "no metrics.parquet at all (the job failed before writing any result)",
    "broken": "metrics.parquet is unreadable or does not follow the schema",
    "missing": "the sweep's multirun.yaml asks for this job but its folder does not exist",
}
"""Every state a job folder is classified into; only ``done`` jobs enter the table by default."""

_JOB_MARKERS = (RESULTS_FILE, DONE_FILE, RUN_ID_FILE, HYDRA_DIR)
_SKIP_DIRS = {HYDRA_DIR, SWEEP_ERRORS_DIR, ".submitit", "wandb", "__pycache__", ".git"}
_ERROR_WORDS = ("error", "exception", "killed", "cancelled", "diverged")


class SchemaError(ValueError):
    """A results table misses a column or holds values of the wrong kind."""


class OutputError(ValueError):
    """The output path (``-o``) cannot be written."""


def check_output(path: str | os.PathLike, *, folder: bool) -> Path:
    """``path`` if it can be written as a folder (``folder``) or as a file, else raise.

    Args:
        path: the ``-o`` of a command.
        folder: True for a folder of outputs (figures), False for one file (a parquet table).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: one line naming the path: a file where a folder is wanted (or the
            reverse), a parent that is a file, or no write permission.
    """
    p = Path(path)
    if p.exists() and folder and not p.is_dir():
        raise OutputError(f"{p} is a file; -o takes a folder (for the figures and summary.md)")
    if p.is_dir() and not folder:
        raise OutputError(f"{p} is a folder; -o takes the path of the parquet file to write")
    probe = p if folder else p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{probe} is a file, so {p} cannot be written; choose another -o")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{probe} is not writable, so {p} cannot be written; choose another -o")
    return p


def check_one_version(versions: dict[str, Any]) -> Any:
    """The one schema version of ``versions`` (input -> its ``schema_version``).

    Raises:
        SchemaError: the inputs were written with different schema versions (one line naming
            each version, its number of inputs and one of them).
    """
    by: dict[Any, list[str]] = {}
    for source, version in versions.items():
        by.setdefault(version, []).append(source)
    if len(by) > 1:
        parts = [f"{v} ({len(src)} input(s), e.g. {src[0]})" for v, src in by.items()]
        raise SchemaError(
            f"mixed schema versions: {', '.join(parts)}; aggregate each version separately "
            "(or rerun the older jobs)"
        )
    return next(iter(by), None)


def normalize_table(
    df: pd.DataFrame, *, source: str = "<table>", columns: dict[str, pa.DataType] = COLUMNS
) -> pd.DataFrame:
    """``df`` with exactly ``columns`` (default: the results table's), in order and typed.

    Raises :class:`SchemaError` naming ``source`` when a column is missing, holds values of
    the wrong kind, or an integer column has missing values.
    """
    try:
        table = conform(df, columns)
    except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
        msg = exc.args[0] if exc.args else type(exc).__name__
        raise SchemaError(f"{source}: {msg}") from None
    for name, kind in columns.items():
        if pa.types.is_integer(kind) and table.column(name).null_count:
            raise SchemaError(f"{source}: column {name!r} must hold integers, found missing values")
    return table.to_pandas()


@dataclass(frozen=True)
class JobRecord:
    """One job folder and what was found in it (``state`` is a key of :data:`JOB_STATES`)."""

    job_dir: str
    state: str
    run_id: str | None = None
    status: str | None = None
    n_rows: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "done"

    def describe(self) -> str:
        """One line naming the job, its state and why."""
        rid = f" run_id={self.run_id}" if self.run_id else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.job_dir} [{self.state}]{rid}{detail}"


@dataclass
class JobTables:
    """What :func:`inspect_job` read: the results, the curves and the resolved config."""

    results: pd.DataFrame
    curves: pd.DataFrame
    config: dict[str, Any]
    schema_version: Any = None


# ----------------------------------------------------------------------------- finding


def _is_job_dir(path: Path) -> bool:
    return any((path / m).exists() for m in _JOB_MARKERS)


def _natural_key(p: Path) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in p.parts]


def _missing_jobs(sweep: Path) -> list[JobRecord]:
    """A ``missing`` record for each job that ``sweep``'s multirun.yaml asks for but lacks."""
    n = expected_job_count(sweep / MULTIRUN_FILE)
    if n is None:
        return []
    detail = f"{MULTIRUN_FILE} asks for {n} jobs; job {{k}} never started"
    return [
        JobRecord(str(sweep / str(k)), "missing", detail=detail.format(k=k))
        for k in range(n)
        if not (sweep / str(k)).is_dir()
    ]


def find_job_dirs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[JobRecord]]:
    """Find job folders under ``paths``.

    A folder is a job folder if it holds ``metrics.parquet``, ``done``, ``run_id`` or ``.hydra/``
    (Hydra writes ``.hydra/`` into every job folder it starts, so a job that died before
    writing results is still found). Job folders are not searched further. A path that is a
    job's ``metrics.parquet`` stands for its folder.

    Returns the job folders (sorted, each once) and one ``missing`` record per job that a
    sweep's ``multirun.yaml`` asks for but whose numbered folder does not exist
    (see :func:`expected_job_count`).
    """
    found: dict[str, Path] = {}
    missing: list[JobRecord] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == RESULTS_FILE:
            found.setdefault(str(p.parent.resolve()), p.parent)
        if not p.is_dir():
            continue
        for root, dirs, _files in os.walk(p, followlinks=False):
            here = Path(root)
            if _is_job_dir(here):
                found.setdefault(str(here.resolve()), here)
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            if (here / MULTIRUN_FILE).is_file():
                missing += _missing_jobs(here)
    return sorted(found.values(), key=_natural_key), missing


def expected_job_count(multirun_yaml: str | os.PathLike) -> int | None:
    """Number of jobs a Hydra multirun asks for, or None when it cannot be told.

    Parses ``hydra.overrides.task`` and ``hydra.sweeper.params`` of ``multirun.yaml`` with
    Hydra's own override parser and multiplies the sizes of the sweeps (BasicSweeper's
    cartesian product). Glob sweeps need the config groups and give None.
    """
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(multirun_yaml)
        task = list(OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or [])
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        lines: dict[str, str] = {str(k): f"{k}={v}" for k, v in dict(params).items()}
        parser = OverridesParser.create()
        for ov in parser.parse_overrides(task):
            lines[ov.get_key_element()] = ov.input_line
        n = 1
        for ov in parser.parse_overrides(list(lines.values())):
            if ov.is_sweep_override():
                n *= len(list(ov.sweep_string_iterator()))
        return n
    except Exception:
        return None


# ----------------------------------------------------------------------------- reading


def _log_files(job_dir: Path) -> list[Path]:
    """The Hydra log ``<job_dir>/*.log`` and submitit's ``.err``/``.out`` files of the job
    (``<job_dir>/.submitit/`` and, for a numbered job folder, hydra-submitit-launcher's
    ``<sweep_dir>/.submitit/<array id>_<job num>/``)."""
    logs = sorted(job_dir.glob("*.log"))
    subs = [job_dir / ".submitit"]
    if job_dir.name.isdigit() and (job_dir.parent / ".submitit").is_dir():
        subs += sorted((job_dir.parent / ".submitit").glob(f"*_{job_dir.name}"))
    for sub in subs:
        if sub.is_dir():
            logs += sorted(sub.rglob("*.err")) + sorted(sub.rglob("*.out"))
    return logs


def _last_error_line(logs: list[Path]) -> str:
    for log in logs:
        try:
            text = log.read_text(errors="replace").splitlines()[-200:]
        except OSError:
            continue
        for line in reversed(text):
            if any(w in line.lower() for w in _ERROR_WORDS):
                return line.strip()[:200]
    return ""


def log_hint(job_dir: str | os.PathLike) -> str:
    """Why a job did not finish: its ``error.txt`` line, else the last line of its logs that
    looks like an error; and where its logs are. "" when there is nothing to show."""
    job_dir = Path(job_dir)
    parts = []
    try:
        error = (job_dir / ERROR_FILE).read_text(errors="replace").strip().splitlines()
        if error:
            parts.append(f"error: {error[0][:200]}")
    except OSError:
        pass
    logs = _log_files(job_dir)
    if logs:
        more = " ..." if len(logs) > 3 else ""
        parts.append("logs: " + ", ".join(str(p) for p in logs[:3]) + more)
        err = "" if (job_dir / ERROR_FILE).is_file() else _last_error_line(logs)
        if err:
            parts.append(f"last error: {err}")
    return "; ".join(parts)


def _read_run_id(job_dir: Path) -> str | None:
    try:
        return (job_dir / RUN_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def _state(status: str | None, done: bool) -> str:
    if status in ("diverged", "failed"):
        return status
    return "done" if done else "unfinished"


def inspect_job(job_dir: str | os.PathLike) -> tuple[JobRecord, JobTables | None]:
    """Classify one job folder and read its tables (checked by :func:`normalize_table`).

    The tables are returned whenever they are readable, whatever the state, so that callers
    may choose to include partial results.
    """
    job = Path(job_dir)
    done, run_id = is_done(job), _read_run_id(job)
    path = job / RESULTS_FILE
    if not path.exists():
        detail = "no metrics.parquet" + (" although `done` exists" if done else "")
        detail = "; ".join(filter(None, [detail, log_hint(job)]))
        return JobRecord(str(job), "broken" if done else "no_results", run_id, detail=detail), None
    try:
        df, meta = read_results(path)
        df = normalize_table(df, source=str(path))
        curves = normalize_table(read_curves(job), source=str(job), columns=CURVE_COLUMNS)
    except Exception as exc:  # unreadable file or schema violation
        detail = f"{type(exc).__name__}: {exc}"
        return JobRecord(str(job), "broken", run_id, detail=detail), None
    status = meta.get("status")
    run_id = run_id or (str(df["run_id"].iloc[0]) if len(df) else None)
    state = _state(status, done)
    detail = ""
    if state != "done":
        bits = [f"status={status!r}", "`done` marker present" if done else "no `done` marker"]
        if len(df):
            bits.append(f"last epoch/step recorded {int(df['epoch'].max())}")
        detail = "; ".join(filter(None, [*bits, log_hint(job)]))
    rec = JobRecord(str(job), state, run_id, status, len(df), detail)
    return rec, JobTables(df, curves, meta.get("config") or {}, meta.get("schema_version"))
