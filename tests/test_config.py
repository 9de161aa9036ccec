"""Config groups compose, types and ranges are checked before any work starts."""

from __future__ import annotations

import itertools

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from pfc_sweeps.config import Config, ConfigError, register_configs, validate

register_configs()
GROUPS = ["task", "dataset", "arch", "loss", "optim", "lam", "logger", "experiment"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


#: Options whose keys the user must set (they say so in one line otherwise).
_TARGET = "{_target_: torchvision.datasets.FakeData}"
NEEDS = {
    "measure": ["arch.checkpoint=checkpoint.pt"],
    "module": [
        f"dataset.train={_TARGET}",
        f"dataset.test={_TARGET}",
        "arch.model={_target_: torch.nn.Linear}",
        "arch.layers=[a]",
        "arch.classifier=a",
    ],
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option):
    cfg = validate(_compose(f"{group}={option}", *NEEDS.get(option, [])))
    assert isinstance(cfg, Config)


def test_dataset_choice_brings_table1_arch_and_recipe_lr():
    for ds, lr, stages in [
        ("mnist", 0.005, []),
        ("cifar100", 0.01, [[64, 32, 3], [128, 16, 3], [256, 8, 4], [512, 4, 4]]),
        ("fashion_mnist", 0.01, [[32, 14, 5], [64, 7, 4]]),
    ]:
        cfg = validate(_compose(f"dataset={ds}"))
        assert cfg.arch.name == ds and cfg.optim.lr == lr and cfg.arch.stages == stages
        assert cfg.train.epochs == 350 and cfg.train.batch_size == 128
        assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
        # docs/metrics.md: lr / 10 at epochs 117 and 233 of 350
        assert sorted(round(f * 350) for f in cfg.optim.decay_at) == [117, 233]
    mnist = validate(_compose("dataset=mnist"))
    assert (mnist.arch.kind, mnist.arch.width, mnist.arch.blocks) == ("fc", 1000, 10)
    # an explicit arch still wins over the data set's default
    assert validate(_compose("dataset=cifar10", "arch=digits")).arch.name == "digits"


def test_paper_fig5_grid_is_40_values_from_0005_to_002():
    cfg = validate(_compose("experiment=paper_fig5"))
    grid = cfg.lam.grid
    assert len(grid) == 40 and grid[0] == pytest.approx(0.0005) and grid[-1] == pytest.approx(0.02)
    assert all(b > a for a, b in itertools.pairwise(grid))
    assert cfg.task.name == "surrogate" and cfg.task.models == ["mufm"]
    assert cfg.loss.name == "mse" and cfg.lam.lam_w == 0.005


def test_paper_fig4_solves_both_models_in_the_paper_setting():
    cfg = validate(_compose("experiment=paper_fig4"))
    s, g = cfg.surrogate, cfg.gaussian
    assert cfg.task.models == ["mufm", "ufm"] and cfg.loss.name == "mse"
    assert (g.num_classes, g.dim, g.n_per_class, g.sigma) == (5, 20, 100, 1.0)
    assert (s.steps, s.lr) == (50_000, 0.1)
    assert (cfg.lam.lam, cfg.lam.lam_w) == (0.001, 0.005)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task.name=foo", "task.name"),
        ("task.models=[mufm,bar]", "task.models[1]"),
        ("lam.lam=-1", "lam.lam"),
        ("lam.lam_w=-0.1", "lam.lam_w"),
        ("lam.grid=[0.1,-0.2]", "lam.grid[1]"),
        ("gaussian.num_classes=1", "gaussian.num_classes"),
        ("gaussian.dim=2", "gaussian.dim"),
        ("surrogate.steps=0", "surrogate.steps"),
        ("surrogate.h_step=sideways", "surrogate.h_step"),
        ("dataset.name=imagenet", "dataset.name"),
        ("dataset.subset_per_class=0", "dataset.subset_per_class"),
        ("arch.block=dense", "arch.block"),
        ("arch.width=0", "arch.width"),
        ("arch=cifar10 arch.stages=[[64,4]]", "arch.stages[0]"),
        ("loss.name=hinge", "loss.name"),
        ("optim.lr=0", "optim.lr"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("optim.decay_at=[1.5]", "optim.decay_at[0]"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=-3", "train.batch_size"),
        ("train.device=tpu", "train.device"),
        ("logger.name=tensorboard", "logger.name"),
        ("logger.mode=sometimes", "logger.mode"),
        ("seed=-1", "seed"),
    ],
)
def test_bad_values_name_their_key(override, key):
    cfg = _compose(*override.split())
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and "\n" not in msg


def test_dim_must_be_at_least_k_minus_1_at_the_boundary():
    validate(_compose("gaussian.num_classes=5", "gaussian.dim=4"))
    with pytest.raises(ConfigError, match=r"gaussian\.dim"):
        validate(_compose("gaussian.num_classes=5", "gaussian.dim=3"))


@pytest.mark.parametrize("override", ["lam.lam=abc", "train.epochs=1.5", "seed=x"])
def test_types_are_checked_on_merge(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(override)


def test_bad_value_stops_launch_with_one_line_and_no_parquet(tmp_path, run_launch):
    out = tmp_path / "bad"
    p = run_launch("task=mufm", "lam.lam=-1", f"hydra.run.dir={out}", "logger=none", timeout=120)
    assert p.returncode != 0
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "lam.lam" in err[0], p.stderr
    assert not list(tmp_path.rglob("*.parquet"))


def test_surrogate_tasks_default_to_mse_but_loss_override_wins():
    assert validate(_compose("task=mufm")).loss.name == "mse"
    assert validate(_compose("task=ufm")).loss.name == "mse"
    assert validate(_compose("task=mufm", "loss=ce")).loss.name == "ce"
    assert validate(_compose()).loss.name == "ce"  # training keeps the paper's CE
