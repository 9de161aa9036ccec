"""Gather the tidy results of many jobs into one table (issue 5).

A sweep leaves one output folder per job (Hydra multirun: ``<sweep_dir>/<job_num>/`` next to
``<sweep_dir>/multirun.yaml``). Each finished job holds, in the layout fixed by
``/tmp/pfc_design.md`` ("Tidy results schema"):

- ``metrics.parquet``: the tidy table; parquet key-value metadata ``b"pfc_sweeps"`` holds the JSON
  ``{"config": <resolved Hydra config>, "status": "running|done|diverged|failed"}``;
- ``run_id``: a text file with the run's id;
- ``done``: an empty marker written last on success.

:func:`aggregate` walks folders, classifies every job folder it finds (see :data:`JOB_STATES`),
concatenates the tables of the finished jobs, drops the rows a requeued job recorded twice
(:func:`drop_duplicate_rows`) and keeps every run's config. The result can be written to one
parquet file (:func:`write_aggregate`, atomic) whose metadata key ``b"pfc_sweeps_aggregate"``
holds ``{"runs": [...], "jobs": [...], ...}`` so that a later :func:`load` gets it all back.

Command line::

    python -m analysis.aggregate <dirs or parquet files...> -o all.parquet [--include-unfinished]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "AGGREGATE_META_KEY",
    "ID_COLUMNS",
    "JOB_META_KEY",
    "JOB_STATES",
    "SCHEMA",
    "Aggregate",
    "JobRecord",
    "NoResultsError",
    "SchemaError",
    "aggregate",
    "drop_duplicate_rows",
    "expected_job_count",
    "find_job_dirs",
    "inspect_job",
    "load",
    "main",
    "normalize_table",
    "read_aggregate",
    "write_aggregate",
]

JOB_META_KEY = b"pfc_sweeps"
"""Parquet metadata key of one job's ``metrics.parquet`` (design doc, results.py)."""

AGGREGATE_META_KEY = b"pfc_sweeps_aggregate"
"""Parquet metadata key of an aggregated file written by :func:`write_aggregate`."""

RESULTS_FILE = "metrics.parquet"
DONE_FILE = "done"
RUN_ID_FILE = "run_id"

SCHEMA: dict[str, str] = {
    "run_id": "str",
    "sweep_id": "str",
    "task": "str",
    "dataset": "str",
    "arch": "str",
    "loss": "str",
    "seed": "int64",
    "lam": "float64",
    "lam_w": "float64",
    "epoch": "int64",
    "split": "str",
    "layer": "int64",
    "rel_pos": "float64",
    "metric": "str",
    "value": "float64",
    "model": "str",
}
"""The tidy results schema of the design doc: column -> dtype, in that order."""

REQUIRED_COLUMNS = ("epoch", "layer", "metric", "value")
"""Columns without which a table cannot be used (others get defaults, see normalize_table)."""

ID_COLUMNS = ("run_id", "epoch", "layer", "metric", "model", "lam", "lam_w", "split", "rel_pos")
"""Columns identifying one measurement. ``rel_pos`` only identifies rows with ``layer == -1``
(the geodesic curve rows, where it holds t); for per-layer rows it is a measured value."""

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

_JOB_MARKERS = (RESULTS_FILE, DONE_FILE, RUN_ID_FILE, ".hydra")
_SKIP_DIRS = {".hydra", ".submitit", "wandb", "__pycache__", ".git", "checkpoints"}


class NoResultsError(ValueError):
    """No finished job (and no aggregated table) was found under the given paths."""


class SchemaError(ValueError):
    """A results table misses a required column or holds values of the wrong kind."""


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
class Aggregate:
    """The gathered results.

    table: the tidy table (columns of :data:`SCHEMA`), duplicates dropped.
    runs:  one row per run_id: run_id, job_dir, status, sweep_id, task, config (JSON string).
    jobs:  every job folder found, finished or not.
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    jobs: list[JobRecord] = field(default_factory=list)
    n_duplicates: int = 0
    n_conflicts: int = 0
    sources: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[JobRecord]:
        """The jobs that did not finish (every state but ``done``)."""
        return [j for j in self.jobs if not j.ok]

    def config(self, run_id: str) -> dict[str, Any]:
        """The resolved config of one run (empty dict if the job stored none)."""
        row = self.runs.loc[self.runs["run_id"] == run_id]
        if row.empty:
            raise KeyError(f"unknown run_id {run_id!r}")
        return json.loads(row["config"].iloc[0] or "{}")

    def report(self) -> str:
        """A short human-readable summary: counts, duplicates, and every unfinished job."""
        n_done = sum(j.ok for j in self.jobs)
        n_runs = self.runs["run_id"].nunique() if len(self.runs) else 0
        lines = [
            f"searched: {', '.join(self.sources)}",
            f"jobs: {len(self.jobs)} found, {n_done} finished, {len(self.problems)} not finished",
            f"runs in table: {n_runs}; rows: {len(self.table)}",
        ]
        if self.n_duplicates:
            lines.append(
                f"dropped {self.n_duplicates} duplicate rows (requeued jobs)"
                + (
                    f", {self.n_conflicts} of them with a different value (kept the last)"
                    if self.n_conflicts
                    else ""
                )
            )
        if self.problems:
            lines.append("unfinished or failed jobs:")
            lines.extend(f"  {j.describe()}" for j in self.problems)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- discovery


def _is_job_dir(path: Path) -> bool:
    return any((path / m).exists() for m in _JOB_MARKERS)


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
        if p.is_file():
            if p.name == RESULTS_FILE:
                found.setdefault(str(p.parent.resolve()), p.parent)
            continue
        if not p.is_dir():
            continue
        for root, dirs, _files in os.walk(p, followlinks=False):
            here = Path(root)
            if _is_job_dir(here):
                found.setdefault(str(here.resolve()), here)
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            if (here / "multirun.yaml").is_file():
                n = expected_job_count(here / "multirun.yaml")
                if n is not None:
                    for k in range(n):
                        if not (here / str(k)).is_dir():
                            missing.append(
                                JobRecord(
                                    str(here / str(k)),
                                    "missing",
                                    detail=f"multirun.yaml asks for {n} jobs; job {k} never started",
                                )
                            )
    return sorted(found.values(), key=_natural_key), missing


def _natural_key(p: Path) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in p.parts]


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


def _log_hint(job_dir: Path) -> str:
    """Point at the job's log files, with the last line that looks like an error.

    Looks at the Hydra log ``<job_dir>/*.log``, ``<job_dir>/.submitit/`` and, for a numbered
    job folder, the submitit folders ``<sweep_dir>/.submitit/<array id>_<job num>/``
    (hydra-submitit-launcher's default layout).
    """
    logs = sorted(job_dir.glob("*.log"))
    subs = [job_dir / ".submitit"]
    if job_dir.name.isdigit() and (job_dir.parent / ".submitit").is_dir():
        subs += sorted((job_dir.parent / ".submitit").glob(f"*_{job_dir.name}"))
    for sub in subs:
        if sub.is_dir():
            logs += sorted(sub.rglob("*.err")) + sorted(sub.rglob("*.out"))
    if not logs:
        return ""
    err = ""
    for log in logs:
        try:
            text = log.read_text(errors="replace").splitlines()[-200:]
        except OSError:
            continue
        for line in reversed(text):
            low = line.lower()
            if any(w in low for w in ("error", "exception", "killed", "cancelled", "diverged")):
                err = line.strip()[:200]
                break
        if err:
            break
    where = "logs: " + ", ".join(str(p) for p in logs[:3]) + (" ..." if len(logs) > 3 else "")
    return f"{where}" + (f"; last error: {err}" if err else "")


def _read_run_id(job_dir: Path) -> str | None:
    try:
        return (job_dir / RUN_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def inspect_job(job_dir: str | os.PathLike) -> tuple[JobRecord, pd.DataFrame | None, dict]:
    """Classify one job folder and read its table.

    Returns (record, table or None, config dict). The table is returned whenever the parquet
    is readable, whatever the state, so that callers may choose to include partial results.
    """
    job = Path(job_dir)
    done = (job / DONE_FILE).exists()
    run_id = _read_run_id(job)
    path = job / RESULTS_FILE
    if not path.exists():
        detail = "no metrics.parquet" + ("" if not done else " although `done` exists")
        hint = _log_hint(job)
        state = "broken" if done else "no_results"
        return (
            JobRecord(str(job), state, run_id, detail="; ".join(filter(None, [detail, hint]))),
            None,
            {},
        )
    try:
        tbl = pq.read_table(path)
        meta_raw = (tbl.schema.metadata or {}).get(JOB_META_KEY)
        meta = json.loads(meta_raw) if meta_raw else {}
        df = normalize_table(tbl.to_pandas(), source=str(path), run_id=run_id)
    except Exception as exc:  # unreadable file or schema violation
        return (
            JobRecord(str(job), "broken", run_id, detail=f"{type(exc).__name__}: {exc}"),
            None,
            {},
        )
    status = meta.get("status")
    config = meta.get("config") or {}
    if run_id is None and len(df):
        run_id = str(df["run_id"].iloc[0])
    if status in ("diverged", "failed"):
        state = status
    elif done:
        state = "done"
    else:
        state = "unfinished"
    detail = ""
    if state != "done":
        bits = [f"status={status!r}", "`done` marker present" if done else "no `done` marker"]
        last = int(df["epoch"].max()) if len(df) else None
        if last is not None:
            bits.append(f"last epoch/step recorded {last}")
        hint = _log_hint(job)
        detail = "; ".join(bits + ([hint] if hint else []))
    rec = JobRecord(str(job), state, run_id, status, len(df), detail)
    return rec, df, config


# ----------------------------------------------------------------------------- tables


def normalize_table(
    df: pd.DataFrame, *, source: str = "<table>", run_id: str | None = None
) -> pd.DataFrame:
    """Bring a results table to :data:`SCHEMA` (column order and dtypes).

    Missing optional columns get defaults: run_id from ``run_id`` (the job's file), sweep_id
    from run_id, strings empty, lam/lam_w/rel_pos NaN, seed 0, split "train", and model "net"
    for task "train". Missing seeds on some rows (the surrogate's model="data" rows) take the
    seed of the same run_id's other rows. Raises :class:`SchemaError` naming ``source`` when a required column
    (:data:`REQUIRED_COLUMNS`) is missing or an integer column holds missing values.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(
            f"{source}: missing column(s) {missing}; a results table needs {list(REQUIRED_COLUMNS)}"
        )
    out = pd.DataFrame(index=df.index)
    n = len(df)
    for col, dtype in SCHEMA.items():
        if col in df.columns:
            s = df[col]
        elif col == "run_id":
            if run_id is None:
                raise SchemaError(f"{source}: no run_id column and no `run_id` file")
            s = pd.Series([run_id] * n, index=df.index)
        elif col == "sweep_id":
            s = out["run_id"]
        elif col in ("lam", "lam_w", "rel_pos"):
            s = pd.Series(np.nan, index=df.index)
        elif col == "seed":
            s = pd.Series(0, index=df.index)
        elif col == "split":
            s = pd.Series(["train"] * n, index=df.index)
        elif col == "model":
            task = df["task"] if "task" in df.columns else pd.Series([""] * n, index=df.index)
            s = pd.Series(np.where(task.astype("str") == "train", "net", ""), index=df.index)
        else:
            s = pd.Series([""] * n, index=df.index)
        if dtype == "int64":
            num = pd.to_numeric(s, errors="coerce")
            if col == "seed" and num.isna().any() and "run_id" in out:
                # the solver may leave seed <NA> on model="data" rows: take the run's seed
                num = num.fillna(num.groupby(out["run_id"]).transform("first"))
            if num.isna().any():
                raise SchemaError(
                    f"{source}: column {col!r} must hold integers, found missing values"
                )
            s = num.astype("int64")
        elif dtype == "float64":
            s = pd.to_numeric(s, errors="coerce").astype("float64")
        else:
            s = s.astype("str")
        out[col] = s
    return out.reset_index(drop=True)


def drop_duplicate_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Drop repeated measurements, keeping the last one written.

    A row is identified by :data:`ID_COLUMNS`; ``rel_pos`` counts only on ``layer == -1`` rows
    (geodesic curve rows hold t there), so a per-layer row re-recorded with a slightly
    different measured rel_pos is still a duplicate. Returns (table, rows dropped, dropped rows
    whose value differed from the kept one).
    """
    if df.empty:
        return df, 0, 0
    key = df[list(ID_COLUMNS)].copy()
    key["rel_pos"] = key["rel_pos"].where(df["layer"] < 0)
    dup = key.duplicated(keep="last")
    n_dup = int(dup.sum())
    n_conf = 0
    if n_dup:
        cols = list(ID_COLUMNS)
        vals = key.assign(value=df["value"]).loc[key.duplicated(keep=False)]
        per_key = vals.groupby(cols, dropna=False)["value"].nunique(dropna=False)
        n_conf = int((per_key - 1).clip(lower=0).sum())
    return df.loc[~dup].reset_index(drop=True), n_dup, n_conf


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    cols = ["run_id", "job_dir", "status", "sweep_id", "task", "config"]
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="str") for c in cols})
    return pd.DataFrame(rows, columns=cols).astype("str")


def aggregate(paths: Sequence[str | os.PathLike], *, include_unfinished: bool = False) -> Aggregate:
    """Gather every job's results under ``paths`` (folders or ``metrics.parquet`` files).

    Only ``done`` jobs enter the table unless ``include_unfinished`` (then every readable
    parquet does, whatever its state). Raises :class:`NoResultsError` naming the searched paths
    when no job folder at all, or no usable table, is found.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise NoResultsError("no input paths given")
    bad = [str(p) for p in paths if not p.exists()]
    if bad:
        raise NoResultsError(f"path(s) do not exist: {', '.join(bad)}")
    job_dirs, missing = find_job_dirs(paths)
    sources = [str(p) for p in paths]
    if not job_dirs and not missing:
        raise NoResultsError(
            f"no job folders (with {RESULTS_FILE}, {DONE_FILE}, {RUN_ID_FILE} or .hydra/) "
            f"found under: {', '.join(sources)}"
        )
    jobs: list[JobRecord] = []
    tables: list[pd.DataFrame] = []
    runs: list[dict] = []
    for jd in job_dirs:
        rec, df, config = inspect_job(jd)
        jobs.append(rec)
        if df is not None and (rec.ok or include_unfinished) and len(df):
            tables.append(df)
            runs.append(
                {
                    "run_id": rec.run_id or str(df["run_id"].iloc[0]),
                    "job_dir": rec.job_dir,
                    "status": rec.status or rec.state,
                    "sweep_id": str(df["sweep_id"].iloc[0]),
                    "task": str(df["task"].iloc[0]),
                    "config": json.dumps(config, sort_keys=True, default=str),
                }
            )
    jobs.extend(missing)
    if not tables:
        lines = "\n  ".join(j.describe() for j in jobs)
        raise NoResultsError(f"no finished job with results under: {', '.join(sources)}\n  {lines}")
    table, n_dup, n_conf = drop_duplicate_rows(pd.concat(tables, ignore_index=True))
    return Aggregate(table, _runs_frame(runs), jobs, n_dup, n_conf, sources)


# ----------------------------------------------------------------------------- files


def write_aggregate(agg: Aggregate, path: str | os.PathLike) -> Path:
    """Write the table to ``path`` atomically (tmp file + os.replace), with runs and jobs in
    the parquet metadata key :data:`AGGREGATE_META_KEY`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "runs": agg.runs.to_dict(orient="records"),
        "jobs": [asdict(j) for j in agg.jobs],
        "n_duplicates": agg.n_duplicates,
        "n_conflicts": agg.n_conflicts,
        "sources": agg.sources,
    }
    tbl = pa.Table.from_pandas(agg.table, preserve_index=False)
    md = dict(tbl.schema.metadata or {})
    md[AGGREGATE_META_KEY] = json.dumps(meta, default=str).encode()
    tbl = tbl.replace_schema_metadata(md)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(tbl, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_aggregate(path: str | os.PathLike) -> Aggregate:
    """Read a file written by :func:`write_aggregate`."""
    path = Path(path)
    tbl = pq.read_table(path)
    raw = (tbl.schema.metadata or {}).get(AGGREGATE_META_KEY)
    if raw is None:
        raise SchemaError(
            f"{path} is not an aggregated results file (no {AGGREGATE_META_KEY.decode()!r} "
            f"metadata); pass job folders or a job's {RESULTS_FILE} instead"
        )
    meta = json.loads(raw)
    table = normalize_table(tbl.to_pandas(), source=str(path))
    jobs = [JobRecord(**j) for j in meta.get("jobs", [])]
    return Aggregate(
        table,
        _runs_frame(meta.get("runs", [])),
        jobs,
        int(meta.get("n_duplicates", 0)),
        int(meta.get("n_conflicts", 0)),
        list(meta.get("sources", [str(path)])),
    )


def _is_aggregate_file(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".parquet" and path.name != RESULTS_FILE):
        return False
    try:
        md = pq.read_schema(path).metadata or {}
    except Exception:
        return False
    return AGGREGATE_META_KEY in md


def load(paths: Sequence[str | os.PathLike], *, include_unfinished: bool = False) -> Aggregate:
    """Load results from any mix of job/sweep folders, job ``metrics.parquet`` files and
    aggregated files (written by :func:`write_aggregate`), combined into one :class:`Aggregate`
    (duplicates across inputs dropped)."""
    paths = [Path(p) for p in paths]
    bad = [str(p) for p in paths if not p.exists()]
    if bad:
        raise NoResultsError(f"path(s) do not exist: {', '.join(bad)}")
    agg_files = [p for p in paths if _is_aggregate_file(p)]
    others = [p for p in paths if p not in agg_files]
    for p in others:
        if p.is_file() and p.name != RESULTS_FILE:
            raise ValueError(
                f"{p}: not a folder, a job's {RESULTS_FILE} or an aggregated parquet file"
            )
    parts = [read_aggregate(p) for p in agg_files]
    if others:
        parts.append(aggregate(others, include_unfinished=include_unfinished))
    if len(parts) == 1:
        return parts[0]
    table, n_dup, n_conf = drop_duplicate_rows(
        pd.concat([a.table for a in parts], ignore_index=True)
    )
    runs = pd.concat([a.runs for a in parts], ignore_index=True).drop_duplicates("run_id")
    return Aggregate(
        table,
        runs.reset_index(drop=True),
        list(itertools.chain.from_iterable(a.jobs for a in parts)),
        n_dup + sum(a.n_duplicates for a in parts),
        n_conf + sum(a.n_conflicts for a in parts),
        list(itertools.chain.from_iterable(a.sources for a in parts)),
    )


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.aggregate <paths...> -o all.parquet``; returns the exit code."""
    ap = argparse.ArgumentParser(
        prog="python -m analysis.aggregate",
        description="Gather the metrics.parquet of every finished job under the given folders "
        "into one tidy parquet file; list unfinished and failed jobs on stderr.",
    )
    ap.add_argument(
        "paths", nargs="+", help="sweep/job folders, metrics.parquet or aggregated files"
    )
    ap.add_argument(
        "-o", "--output", required=True, help="output parquet file (written atomically)"
    )
    ap.add_argument(
        "--include-unfinished",
        action="store_true",
        help="also take the rows of jobs without a `done` marker (running, failed, diverged)",
    )
    args = ap.parse_args(argv)
    try:
        agg = load(args.paths, include_unfinished=args.include_unfinished)
    except (NoResultsError, SchemaError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for j in agg.problems:
        print(f"warning: not finished: {j.describe()}", file=sys.stderr)
    out = write_aggregate(agg, args.output)
    print(agg.report())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
