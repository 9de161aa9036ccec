"""The tidy parquet sink: schema, metadata, atomic writes, the done marker."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pfc_sweeps.results import sink as results
from pfc_sweeps.results.schema import COLUMNS, PFC1, SCHEMA_VERSION, TEST_ACC, is_done, read_results
from pfc_sweeps.results.sink import ResultsSink

META = dict(
    run_id="r1", sweep_id="s1", task="train", dataset="digits", arch="digits", loss="ce",
    seed=3, lam=math.nan, lam_w=math.nan,
)  # fmt: skip


def _rows(epoch: int, layers: int = 3) -> list[dict]:
    return [
        {
            "epoch": epoch,
            "layer": l,
            "rel_pos": l / (layers - 1),
            "metric": PFC1,
            "value": 1.0 / (l + 1),
        }
        for l in range(layers)
    ]


def test_schema_types_and_metadata(tmp_path):
    sink = ResultsSink(tmp_path, META, {"a": 1, "nested": {"b": [1, 2]}})
    sink.add(_rows(1))
    sink.add([{"epoch": 1, "layer": -1, "metric": TEST_ACC, "value": 0.5, "split": "test"}])
    sink.finish("done")
    schema = pq.read_schema(tmp_path / "metrics.parquet")
    assert schema.names == list(COLUMNS)
    assert [schema.field(c).type for c in COLUMNS] == list(COLUMNS.values())
    df, meta = read_results(tmp_path)
    assert meta == {
        "config": {"a": 1, "nested": {"b": [1, 2]}},
        "status": "done",
        "schema_version": SCHEMA_VERSION,
    }
    assert len(df) == 4
    assert set(df["run_id"]) == {"r1"} and set(df["seed"]) == {3}
    assert df.loc[df.metric == TEST_ACC, "split"].item() == "test"
    assert (df.loc[df.metric == PFC1, "split"] == "train").all()
    assert (df["model"] == "net").all()
    assert np.isnan(df.loc[df.metric == TEST_ACC, "rel_pos"]).all()
    np.testing.assert_allclose(df.loc[df.metric == PFC1, "value"], [1, 1 / 2, 1 / 3])
    assert is_done(tmp_path)


def test_a_directory_is_never_read_as_a_dataset(tmp_path):
    """read_table reads one file: a directory (even one holding a job's table, or one that a
    job has just created) is an OSError, not a merge of its parquet files or an empty table."""
    from pfc_sweeps.results.schema import read_table

    sink = ResultsSink(tmp_path / "job", META, {})
    sink.add(_rows(1))
    sink.finish("done")
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "job", tmp_path / "empty"):
        with pytest.raises(OSError, match="directory"):
            read_table(d)
    with pytest.raises(FileNotFoundError):  # an empty job dir: no table yet
        read_results(tmp_path / "empty")
    assert len(read_results(tmp_path / "job")[0]) == 3


def test_done_is_written_last_and_only_on_success(tmp_path):
    sink = ResultsSink(tmp_path, META, {})
    sink.add(_rows(1))
    sink.write("running")
    assert not is_done(tmp_path)
    sink.finish("diverged")
    assert not is_done(tmp_path)
    assert read_results(tmp_path)[1]["status"] == "diverged"
    sink.finish("done")
    assert is_done(tmp_path)
    assert os.path.getmtime(tmp_path / "done") >= os.path.getmtime(tmp_path / "metrics.parquet")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    sink = ResultsSink(tmp_path, META, {})
    sink.add(_rows(1))
    sink.write()
    before = (tmp_path / "metrics.parquet").read_bytes()
    sink.add(_rows(2))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        sink.write()
    # the old table is intact and no temporary file is left behind
    assert (tmp_path / "metrics.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"epoch": 1, "layer": 0, "metric": PFC1, "value": float("nan")}], "non-finite"),
        ([{"epoch": 1, "layer": 0, "metric": PFC1, "value": float("inf")}], "non-finite"),
        ([{"epoch": 1, "layer": 0, "metric": PFC1}], "lack columns"),
        ([{"epoch": 1, "layer": 0, "metric": PFC1, "value": 1.0, "colour": "red"}], "unknown"),
    ],
)
def test_bad_rows_are_rejected(tmp_path, rows, match):
    sink = ResultsSink(tmp_path, META, {})
    with pytest.raises(ValueError, match=match):
        sink.add(rows)
    assert not (tmp_path / "metrics.parquet").exists()


def test_meta_must_be_complete(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        ResultsSink(tmp_path, {k: v for k, v in META.items() if k != "run_id"}, {})


def test_surrogate_rows_carry_model_and_lam(tmp_path):
    sink = ResultsSink(tmp_path, {**META, "task": "mufm", "lam": 0.001, "lam_w": 0.005}, {})
    df = pd.DataFrame(
        {"epoch": [10, 10], "layer": [-1, -1], "metric": [PFC1, PFC1], "value": [0.1, 0.2],
         "model": ["mufm", "ufm"], "lam": [0.002, 0.004]}
    )  # fmt: skip
    sink.add(df)
    sink.finish()
    out, _ = read_results(tmp_path / "metrics.parquet")
    assert list(out["model"]) == ["mufm", "ufm"]
    assert list(out["lam"]) == [0.002, 0.004]
    assert list(out["lam_w"]) == [0.005, 0.005]
