"""The ``python -m analysis.figures`` command: the paper's Figures 2-5 from a results table.

The figure functions themselves are in :mod:`pfc_sweeps.results.figures` (W&B draws with them too).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import Aggregate, NoResultsError, SchemaError, load
from analysis.discovery import OutputError, check_output
from pfc_sweeps.results.figures import (
    PAPER_LAM,
    FigureDataError,
    fig2_training_curves,
    fig3_depth_profile,
    fig4_surrogate_bars,
    fig5_lambda_tradeoff,
    fig_paths,
)
from pfc_sweeps.results.schema import (
    atomic_write_bytes,
)
from pfc_sweeps.results.summary import render_summary, write_summary
from pfc_sweeps.results.tidy import (
    seed_clashes,
)

# ----------------------------------------------------------------------------- driver

FIGURES: dict[str, tuple[str, Callable[..., Figure]]] = {
    "fig2": ("fig2_training_curves", fig2_training_curves),
    "fig3": ("fig3_depth_profile", fig3_depth_profile),
    "fig4": ("fig4_surrogate_bars", fig4_surrogate_bars),
    "fig5": ("fig5_lambda_tradeoff", fig5_lambda_tradeoff),
    "paths": ("fig_paths_straightness", fig_paths),
}
"""Figure key -> (file stem, function)."""


def save_figure(
    fig: Figure,
    out_dir: str | os.PathLike,
    stem: str,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<stem>.<fmt>`` for each format, each atomically."""
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        path = Path(out_dir) / f"{stem}.{fmt}"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def make_figures(
    results: Aggregate | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    tol: float = 0.02,
    lam: float | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> dict[str, str]:
    """Draw every figure the data supports into ``out_dir`` and write ``summary.md`` there.

    Returns figure key -> "drawn: <files>" or "skipped: <reason>" (also listed in summary.md).
    """
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad:
        raise ValueError(f"unsupported format(s) {bad}; allowed: png, pdf, svg")
    agg = results if isinstance(results, Aggregate) else Aggregate(results, pd.DataFrame())
    df, curves = agg.table, agg.curves
    out = Path(out_dir)
    report: dict[str, str] = {}
    options = {"fig3": {"curves": curves}, "fig4": {"lam": lam}}
    for key, (stem, fn) in FIGURES.items():
        try:
            fig = fn(df, **options.get(key, {}))
        except FigureDataError as exc:
            report[key] = f"skipped: {exc}"
            continue
        paths = save_figure(fig, out, stem, formats, dpi)
        report[key] = "drawn: " + ", ".join(p.name for p in paths)
    notes = seed_clashes(df)
    text = render_summary(
        df,
        curves=curves,
        notes=notes,
        tol=tol,
        problems=[j.describe() for j in agg.problems],
        figures=report,
        sources=agg.sources,
    )
    write_summary(text, out / "summary.md")
    return report


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m analysis.figures",
        description="Draw the paper's Figures 2-5 (PNG + PDF) and summary.md from sweep/job "
        "folders or an aggregated parquet file.",
    )
    ap.add_argument("inputs", nargs="+", help="sweep or job folders, metrics.parquet, all.parquet")
    ap.add_argument(
        "-o", "--output", required=True, help="output folder for figures and summary.md"
    )
    ap.add_argument(
        "--tol", type=float, default=0.02, help="monotonicity tolerance (relative), default 0.02"
    )
    ap.add_argument(
        "--lam",
        type=float,
        default=None,
        help=f"λ for Fig. 4 (nearest present; default {PAPER_LAM})",
    )
    ap.add_argument(
        "--formats", nargs="+", default=["png", "pdf"], help="figure formats (png pdf svg)"
    )
    ap.add_argument("--dpi", type=int, default=150, help="PNG resolution, default 150")
    ap.add_argument(
        "--include-unfinished", action="store_true", help="also use jobs without `done`"
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.figures <inputs...> -o figs/``; returns the exit code."""
    matplotlib.use("Agg")
    args = _parser().parse_args(argv)
    try:
        check_output(args.output, folder=True)
        agg = load(args.inputs, include_unfinished=args.include_unfinished)
        for j in agg.problems:
            print(f"warning: not finished: {j.describe()}", file=sys.stderr)
        report = make_figures(
            agg, args.output, tol=args.tol, lam=args.lam, formats=args.formats, dpi=args.dpi
        )
    except (NoResultsError, SchemaError, OutputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 2
    for key, what in report.items():
        print(f"{key}: {what}")
    print(f"wrote {Path(args.output) / 'summary.md'}")
    if not any(v.startswith("drawn") for v in report.values()):
        print("error: the data supports none of the figures", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
