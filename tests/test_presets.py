"""Every experiment preset runs end to end (in-process) on tiny data written in the real formats."""

from __future__ import annotations

import fakedata
import pytest
from inprocess import run_in_process

from pfc_sweeps.results.schema import PFC1, read_results

TINY_TRAIN = ["logger=none", "train.epochs=2", "train.geodesic_points=3", "dataset.download=false"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "stl10", "cifar100"])
def test_paper_dataset_preset_trains_on_tiny_files(tmp_path, no_md5, name):
    root = tmp_path / "data"
    fakedata.write(name, root, n_per_class=1 if name == "cifar100" else 2)
    out = tmp_path / "run"
    run_in_process(out, f"experiment=paper_{name}", f"dataset.root={root}", *TINY_TRAIN)
    df, meta = read_results(out)
    assert meta["status"] == "done" and meta["config"]["experiment"] == f"paper_{name}"
    assert set(df["dataset"]) == {name} and set(df["arch"]) == {name}
    # Table I: the number of studied layers (blocks of the last stage + its input)
    blocks = {"mnist": 10, "fashion_mnist": 4, "cifar10": 4, "stl10": 5, "cifar100": 4}[name]
    layers = sorted(df.loc[(df.metric == PFC1) & (df.epoch == 2), "layer"])
    assert layers == list(range(blocks + 1))
    lr = meta["config"]["optim"]["lr"]
    assert lr == (0.005 if name == "mnist" else 0.01)


@pytest.mark.parametrize("preset", ["paper_fig4", "paper_fig5"])
def test_surrogate_presets_run_short(tmp_path, preset):
    out = tmp_path / preset
    run_in_process(
        out, f"experiment={preset}", "logger=none", "surrogate.steps=200", "surrogate.log_every=100"
    )
    df, meta = read_results(out)
    assert meta["status"] == "done"
    models = set(df["model"])
    lams = df.loc[df.model != "data", "lam"].unique()
    if preset == "paper_fig4":
        assert models == {"data", "mufm", "ufm"} and len(lams) == 1
    else:
        assert models == {"data", "mufm"} and len(lams) == 40
    assert sorted(df["epoch"].unique())[-1] == 200
