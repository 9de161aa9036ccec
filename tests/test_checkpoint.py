"""The background checkpoint writer: snapshot at save time, errors surface, no temporaries."""

from __future__ import annotations

import pytest
import torch

from pfc_sweeps.jobs.checkpoint import CheckpointWriter, cpu_copy
from pfc_sweeps.results.schema import TEMP_GLOB


def test_snapshot_is_taken_at_save_time(tmp_path):
    live = torch.zeros(1000, 1000)
    state = {"model": {"w": live}, "epoch": 1, "nested": [live[:2], (live[0, 0],)]}
    writer = CheckpointWriter()
    writer.save(tmp_path / "ckpt.pt", state)
    live.add_(1.0)  # training goes on while the thread writes
    writer.close()
    back = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert back["epoch"] == 1 and float(back["model"]["w"].abs().sum()) == 0.0
    assert float(back["nested"][0].sum()) == 0.0 and float(back["nested"][1][0]) == 0.0
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_each_save_replaces_the_last_and_waits_for_it(tmp_path):
    writer = CheckpointWriter()
    for epoch in range(1, 6):
        writer.save(tmp_path / "ckpt.pt", {"epoch": epoch, "w": torch.full((300, 300), epoch)})
    writer.close()
    back = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert back["epoch"] == 5 and torch.equal(back["w"], torch.full((300, 300), 5))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_failed_write_is_raised_by_wait(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    writer = CheckpointWriter()
    writer.save(blocker / "ckpt.pt", {"epoch": 1})  # the parent is a file: the write fails
    with pytest.raises(OSError):
        writer.wait()
    writer.close()  # nothing pending any more


def test_cpu_copy_copies_every_tensor():
    t = torch.arange(4.0)
    out = cpu_copy({"a": [t, {"b": (t, 3)}], "c": "x"})
    assert out["c"] == "x" and out["a"][1]["b"][1] == 3
    for copy in (out["a"][0], out["a"][1]["b"][0]):
        assert torch.equal(copy, t) and copy.data_ptr() != t.data_ptr()
