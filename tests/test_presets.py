"""Every experiment preset runs end to end (in-process) on tiny data written in the real formats."""

from __future__ import annotations

import fakedata
import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from pfc_sweeps.config import register_configs
from pfc_sweeps.jobs import dispatch as tasks
from pfc_sweeps.results.schema import PFC1, read_results

register_configs()


def run_in_process(out_dir, *overrides: str) -> None:
    """What ``python launch.py OVERRIDES hydra.run.dir=OUT_DIR`` does, without a subprocess."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.name = "launch"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks.main(cfg)


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
