"""End to end: real ``launch.py -m`` sweeps, then ``analysis.aggregate`` and ``analysis.figures``
on their folders, each in a subprocess as a user runs them; the figures and ``summary.md``
are checked against the jobs' own parquet files (read independently, job by job)."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, launch

from analysis import figures
from analysis.aggregate import read_aggregate
from pfc_sweeps.results.schema import (
    ALIGNMENT,
    CURVES_FILE,
    PFC1,
    PFC2,
    RESULTS_FILE,
    TEST_ACC,
    TRAIN_ACC,
    read_curves,
    read_results,
)

matplotlib.use("Agg")

TRAIN = [
    "logger=none",
    "train.epochs=2",
    "arch.width=16",
    "arch.blocks=2",
    "train.geodesic_points=5",
    "seed=0,1",
]
LAMS = (0.0005, 0.001, 0.005)
SURROGATE = [
    "task=mufm",
    "logger=none",
    "surrogate.steps=200",
    "surrogate.log_every=100",
    f"lam.lam={','.join(map(str, LAMS))}",
]


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def _jobs(sweep) -> list:
    return sorted(p.parent for p in sweep.glob(f"*/{RESULTS_FILE}"))


def _summary_rows(text: str, section: str) -> list[dict]:
    block = text.split(f"## {section}")[1].split("\n## ")[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return [dict(zip(head, row, strict=True)) for row in cells]


def _last(df: pd.DataFrame, metric: str, **where) -> float:
    rows = df.loc[df["metric"] == metric]
    for k, v in where.items():
        rows = rows.loc[rows[k] == v]
    return float(rows.loc[rows["epoch"] == rows["epoch"].max(), "value"].item())


@pytest.mark.slow
def test_sweeps_to_figures_and_summary(tmp_path):
    train_dir, sur_dir = tmp_path / "train", tmp_path / "sur"
    p = launch("-m", *TRAIN, f"hydra.sweep.dir={train_dir}")
    assert p.returncode == 0, p.stderr
    p = launch("-m", *SURROGATE, f"hydra.sweep.dir={sur_dir}")
    assert p.returncode == 0, p.stderr
    train_jobs, sur_jobs = _jobs(train_dir), _jobs(sur_dir)
    assert len(train_jobs) == 2 and len(sur_jobs) == 3
    assert all((j / CURVES_FILE).exists() for j in train_jobs)
    assert not any((j / CURVES_FILE).exists() for j in sur_jobs)

    all_file = tmp_path / "all.parquet"
    p = _module("analysis.aggregate", str(train_dir), str(sur_dir), "-o", str(all_file))
    assert p.returncode == 0, p.stderr
    figs = tmp_path / "figs"
    p = _module("analysis.figures", str(all_file), "-o", str(figs), "--dpi", "40")
    assert p.returncode == 0, p.stderr
    for stem in ("fig2_training_curves", "fig3_depth_profile", "fig4_surrogate_bars"):
        assert (figs / f"{stem}.png").stat().st_size > 1000
    assert (figs / "fig5_lambda_tradeoff.pdf").stat().st_size > 1000

    # the aggregated tables are the jobs' tables, row for row
    agg = read_aggregate(all_file)
    jobs = {str(read_results(j)[0]["run_id"].iloc[0]): j for j in train_jobs + sur_jobs}
    tables = {rid: read_results(j)[0] for rid, j in jobs.items()}
    assert set(agg.table["run_id"]) == set(jobs)
    assert len(agg.table) == sum(len(t) for t in tables.values())
    assert len(agg.curves) == sum(len(read_curves(j)) for j in train_jobs) > 0
    sur_rows = agg.table.loc[agg.table["model"] != "net"]
    assert (sur_rows["arch"] == sur_rows["model"]).all()  # arch says what was solved

    text = (figs / "summary.md").read_text()
    assert "5 runs: 2 training, 3 surrogate." in text
    for row in _summary_rows(text, "Training runs"):
        df = tables[row["run_id"]]
        assert row["train acc"] == f"{_last(df, TRAIN_ACC):.4g}"
        assert row["test acc"] == f"{_last(df, TEST_ACC):.4g}"
        assert row["epoch"] == "2"
    sur = _summary_rows(text, "Surrogate runs")
    assert sorted(float(r["λ"]) for r in sur) == list(LAMS)
    for row in sur:
        df = tables[row["run_id"]]
        assert row[PFC1] == format(_last(df, PFC1, model="mufm"), ".4g")
        assert row[ALIGNMENT] == f"{_last(df, ALIGNMENT, model='mufm'):.4g}"
        assert row[f"data_{PFC2}"] == format(_last(df, PFC2, model="data"), ".4g")
        assert row["step"] == "200"

    # the figures hold the parquet's numbers: Fig. 5 (one MUFM point per λ job) and Fig. 3
    fig5 = figures.fig5_lambda_tradeoff(agg.table, metrics=(PFC1,))
    line = next(ln for ln in fig5.axes[0].get_lines() if len(ln.get_xdata()) == len(LAMS))
    want = [_last(tables[rid], PFC1, model="mufm") for rid in _by_lam(tables)]
    np.testing.assert_allclose(line.get_xdata(), np.array(LAMS) / 0.005)
    np.testing.assert_allclose(line.get_ydata(), want)
    fig3 = figures.fig3_depth_profile(agg.table, metrics=(PFC2,), curves=agg.curves)
    obs, geo = [ln for ln in fig3.axes[0].get_lines() if len(ln.get_xdata())]
    last = pd.concat([t for rid, t in tables.items() if t["model"].iloc[0] == "net"])
    last = last.loc[(last["metric"] == PFC2) & (last["epoch"] == 2) & (last["layer"] >= 0)]
    np.testing.assert_allclose(obs.get_ydata(), last.groupby("layer")["value"].mean())
    curves = agg.curves.loc[(agg.curves["metric"] == PFC2) & (agg.curves["epoch"] == 2)]
    np.testing.assert_allclose(geo.get_xdata(), np.linspace(0, 1, 5))
    np.testing.assert_allclose(geo.get_ydata(), curves.groupby("t")["value"].mean())


def _by_lam(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The surrogate run ids ordered by their λ."""
    lam = {
        rid: float(t.loc[t["model"] == "mufm", "lam"].iloc[0])
        for rid, t in tables.items()
        if (t["model"] == "mufm").any()
    }
    return sorted(lam, key=lam.get)
