"""Gather the tidy results of many jobs into one table, and its command line.

:func:`aggregate` takes the job folders that :mod:`analysis.discovery` finds, concatenates
the results (and curves) of the finished jobs, drops the rows a requeued job recorded twice
(:func:`drop_duplicate_rows`) and keeps every run's config. The result can be written to one
parquet file (:func:`write_aggregate`, with its curves next to it) whose metadata holds
``{"aggregate": {"runs": [...], "jobs": [...], ...}}``, so that a later :func:`load` gets it
all back. Columns, metadata key, reader and writer are those of :mod:`pfc_sweeps.results.schema`.

Command line::

    python -m analysis.aggregate <dirs or parquet files...> -o all.parquet [--include-unfinished]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.discovery import (
    JobRecord,
    JobTables,
    OutputError,
    SchemaError,
    check_one_version,
    check_output,
    find_job_dirs,
    inspect_job,
    normalize_table,
)
from pfc_sweeps.results.schema import (
    COLUMNS,
    CURVE_COLUMNS,
    CURVE_KEY,
    CURVES_FILE,
    RESULT_KEY,
    RESULTS_FILE,
    empty_frame,
    read_metadata,
    read_table,
    write_table,
)

__all__ = [
    "Aggregate",
    "NoResultsError",
    "SchemaError",
    "aggregate",
    "curves_path",
    "drop_duplicate_rows",
    "load",
    "main",
    "read_aggregate",
    "write_aggregate",
]

_AGG = "aggregate"  # key of an aggregated file's metadata dict
_RUN_FIELDS = ["run_id", "job_dir", "status", "sweep_id", "task", "config"]


class NoResultsError(ValueError):
    """No finished job (and no aggregated table) was found under the given paths."""


@dataclass
class Aggregate:
    """The gathered results.

    table:  the tidy results table (:data:`~pfc_sweeps.results.schema.COLUMNS`), duplicates dropped.
    runs:   one row per run_id: run_id, job_dir, status, sweep_id, task, config (JSON string).
    jobs:   every job folder found, finished or not.
    curves: the geodesic curves (:data:`~pfc_sweeps.results.schema.CURVE_COLUMNS`) of those runs.
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    jobs: list[JobRecord] = field(default_factory=list)
    n_duplicates: int = 0
    n_conflicts: int = 0
    sources: list[str] = field(default_factory=list)
    curves: pd.DataFrame = field(default_factory=lambda: empty_frame(CURVES_FILE))
    schema_version: Any = None

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
            f"runs in table: {n_runs}; rows: {len(self.table)}; curve points: {len(self.curves)}",
        ]
        if self.n_duplicates:
            conflicts = f", {self.n_conflicts} of them with a different value (kept the last)"
            lines.append(
                f"dropped {self.n_duplicates} duplicate rows (requeued jobs)"
                + (conflicts if self.n_conflicts else "")
            )
        if self.problems:
            lines.append("unfinished or failed jobs:")
            lines.extend(f"  {j.describe()}" for j in self.problems)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def drop_duplicate_rows(
    df: pd.DataFrame, key: Sequence[str] = RESULT_KEY
) -> tuple[pd.DataFrame, int, int]:
    """Drop repeated measurements (same ``key`` columns), keeping the last one written.

    ``key``: :data:`~pfc_sweeps.results.schema.RESULT_KEY` for results (a per-layer row re-recorded
    with another measured rel_pos is still a duplicate), ``CURVE_KEY`` for curves. Returns
    (table, rows dropped, dropped rows whose value differed from the kept one).
    """
    if df.empty:
        return df, 0, 0
    key = list(key)
    dup = df.duplicated(key, keep="last")
    n_dup = int(dup.sum())
    n_conf = 0
    if n_dup:
        rows = df.loc[df.duplicated(key, keep=False)]
        per_key = rows.groupby(key, dropna=False)["value"].nunique(dropna=False)
        n_conf = int((per_key - 1).clip(lower=0).sum())
    return df.loc[~dup].reset_index(drop=True), n_dup, n_conf


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="str") for c in _RUN_FIELDS})
    return pd.DataFrame(rows, columns=_RUN_FIELDS).astype("str")


def _run_row(rec: JobRecord, tables: JobTables) -> dict[str, str]:
    df = tables.results
    return {
        "run_id": rec.run_id or str(df["run_id"].iloc[0]),
        "job_dir": rec.job_dir,
        "status": rec.status or rec.state,
        "sweep_id": str(df["sweep_id"].iloc[0]),
        "task": str(df["task"].iloc[0]),
        "config": json.dumps(tables.config, sort_keys=True, default=str),
    }


def _concat(frames: list[pd.DataFrame], name: str) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else empty_frame(name)


def _check_paths(paths: Sequence[Path]) -> None:
    if not paths:
        raise NoResultsError("no input paths given")
    bad = [str(p) for p in paths if not p.exists()]
    if bad:
        raise NoResultsError(f"path(s) do not exist: {', '.join(bad)}")


def aggregate(paths: Sequence[str | os.PathLike], *, include_unfinished: bool = False) -> Aggregate:
    """Gather every job's results under ``paths`` (folders or ``metrics.parquet`` files).

    Only ``done`` jobs enter the table unless ``include_unfinished`` (then every readable
    parquet does, whatever its state). Raises :class:`NoResultsError` naming the searched paths
    when no job folder at all, or no usable table, is found.
    """
    paths = [Path(p) for p in paths]
    _check_paths(paths)
    job_dirs, missing = find_job_dirs(paths)
    sources = [str(p) for p in paths]
    if not job_dirs and not missing:
        raise NoResultsError(f"no job folders found under: {', '.join(sources)}")
    jobs: list[JobRecord] = []
    kept: list[JobTables] = []
    runs: list[dict] = []
    versions: dict[str, Any] = {}
    for jd in job_dirs:
        rec, tables = inspect_job(jd)
        jobs.append(rec)
        if tables is not None and (rec.ok or include_unfinished) and len(tables.results):
            kept.append(tables)
            runs.append(_run_row(rec, tables))
            versions[rec.job_dir] = tables.schema_version
    jobs.extend(missing)
    if not kept:
        lines = "\n  ".join(j.describe() for j in jobs)
        raise NoResultsError(f"no finished job with results under: {', '.join(sources)}\n  {lines}")
    table, n_dup, n_conf = drop_duplicate_rows(_concat([t.results for t in kept], RESULTS_FILE))
    curves, _, _ = drop_duplicate_rows(_concat([t.curves for t in kept], CURVES_FILE), CURVE_KEY)
    version = check_one_version(versions)
    return Aggregate(table, _runs_frame(runs), jobs, n_dup, n_conf, sources, curves, version)


# ----------------------------------------------------------------------------- files


def curves_path(path: str | os.PathLike) -> Path:
    """Where :func:`write_aggregate` puts the curves of the aggregated file ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.curves{path.suffix or '.parquet'}")


def write_aggregate(agg: Aggregate, path: str | os.PathLike) -> Path:
    """Write the table to ``path`` (and, if any, the curves to :func:`curves_path`), each
    atomically, with runs and jobs in the metadata."""
    meta = {
        "runs": agg.runs.to_dict(orient="records"),
        "jobs": [asdict(j) for j in agg.jobs],
        "n_duplicates": agg.n_duplicates,
        "n_conflicts": agg.n_conflicts,
        "sources": agg.sources,
    }
    if len(agg.curves):
        write_table(curves_path(path), agg.curves, {"curves_of": Path(path).name}, CURVE_COLUMNS)
    return write_table(path, agg.table, {_AGG: meta}, COLUMNS)


def read_aggregate(path: str | os.PathLike) -> Aggregate:
    """Read a file written by :func:`write_aggregate` (and its curves)."""
    path = Path(path)
    df, meta = read_table(path)
    version = meta.get("schema_version")
    if _AGG not in meta:
        raise SchemaError(
            f"{path} is not an aggregated results file (no {_AGG!r} metadata); "
            f"pass job folders or a job's {RESULTS_FILE} instead"
        )
    meta = meta[_AGG]
    cpath = curves_path(path)
    curves = read_table(cpath)[0] if cpath.exists() else empty_frame(CURVES_FILE)
    return Aggregate(
        normalize_table(df, source=str(path)),
        _runs_frame(meta.get("runs", [])),
        [JobRecord(**j) for j in meta.get("jobs", [])],
        int(meta.get("n_duplicates", 0)),
        int(meta.get("n_conflicts", 0)),
        list(meta.get("sources", [str(path)])),
        normalize_table(curves, source=str(cpath), columns=CURVE_COLUMNS),
        version,
    )


def _is_aggregate_file(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".parquet" and path.name != RESULTS_FILE):
        return False
    try:
        return _AGG in read_metadata(path)
    except Exception:
        return False


def _combine(parts: list[Aggregate]) -> Aggregate:
    version = check_one_version({", ".join(a.sources): a.schema_version for a in parts})
    table, n_dup, n_conf = drop_duplicate_rows(_concat([a.table for a in parts], RESULTS_FILE))
    curves, _, _ = drop_duplicate_rows(_concat([a.curves for a in parts], CURVES_FILE), CURVE_KEY)
    runs = pd.concat([a.runs for a in parts], ignore_index=True).drop_duplicates("run_id")
    return Aggregate(
        table,
        runs.reset_index(drop=True),
        list(itertools.chain.from_iterable(a.jobs for a in parts)),
        n_dup + sum(a.n_duplicates for a in parts),
        n_conf + sum(a.n_conflicts for a in parts),
        list(itertools.chain.from_iterable(a.sources for a in parts)),
        curves,
        version,
    )


def load(paths: Sequence[str | os.PathLike], *, include_unfinished: bool = False) -> Aggregate:
    """Load results from any mix of job/sweep folders, job ``metrics.parquet`` files and
    aggregated files (written by :func:`write_aggregate`), combined into one :class:`Aggregate`
    (duplicates across inputs dropped)."""
    paths = [Path(p) for p in paths]
    _check_paths(paths)
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
    return parts[0] if len(parts) == 1 else _combine(parts)


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m analysis.aggregate",
        description=f"Gather the {RESULTS_FILE} (and {CURVES_FILE}) of every finished job under "
        "the given folders into one tidy parquet file; list unfinished and failed jobs on stderr.",
    )
    ap.add_argument(
        "paths", nargs="+", help=f"sweep/job folders, {RESULTS_FILE} or aggregated files"
    )
    ap.add_argument(
        "-o", "--output", required=True, help="output parquet file (written atomically)"
    )
    ap.add_argument(
        "--include-unfinished",
        action="store_true",
        help="also take the rows of jobs without a `done` marker (running, failed, diverged)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.aggregate <paths...> -o all.parquet``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        check_output(args.output, folder=False)
        agg = load(args.paths, include_unfinished=args.include_unfinished)
        for j in agg.problems:
            print(f"warning: not finished: {j.describe()}", file=sys.stderr)
        out = write_aggregate(agg, args.output)
    except (NoResultsError, SchemaError, OutputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 2
    print(agg.report())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
