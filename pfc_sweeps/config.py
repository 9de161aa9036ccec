"""Structured configs: the typed schema of every config group, and its range checks.

The dataclasses below are registered in Hydra's ConfigStore as ``base_config``; the YAML
files under ``conf/`` only say what differs from these defaults (one source of truth per
default).  OmegaConf checks the types when a config or an override is merged;
:func:`validate` checks the ranges before any work starts and raises a one-line
:class:`ConfigError` that names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ArchConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "LamConfig",
    "LoggerConfig",
    "LossConfig",
    "MeasureConfig",
    "OptimConfig",
    "SurrogateConfig",
    "TaskConfig",
    "TrainConfig",
    "register_configs",
    "validate",
]

TASKS = ("train", "mufm", "ufm", "measure")
SURROGATE_MODELS = ("mufm", "ufm")
DATASETS = (
    "digits",
    "gaussian",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "stl10",
    "cifar100",
    "module",
)
LOSSES = ("ce", "mse")
OPTIMIZERS = ("sgd",)
ARCH_KINDS = ("fc", "conv", "module")
MEASURE_SPLITS = ("train", "test")
BLOCKS = ("relu", "mlp", "preact_bn", "mlp_bn")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
H_STEPS = ("per_sample", "per_class", "mean")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config value is out of range; the message names the key and what is allowed."""


@dataclass
class TaskConfig:
    """Which job to run: ``train`` (a ResNet), ``mufm`` or ``ufm`` (surrogate solves)."""

    name: str = "train"
    # Surrogate models solved in the job, on the same data X (``paper_fig4``: both).
    models: list[str] = field(default_factory=list)


@dataclass
class DatasetConfig:
    """A data set (``pfc_sweeps.data``); ``root: null`` means the user cache dir."""

    name: str = "digits"
    root: str | None = None
    download: bool = True
    # Balanced, seeded subset of the training split (null: all samples).
    n_per_class: int | None = None
    # Only for ``gaussian``: K classes of N(mu_k, sigma^2 I_dim), mu_k on the unit sphere.
    num_classes: int = 10
    dim: int = 20
    sigma: float = 1.0
    n_train_per_class: int = 100
    n_test_per_class: int = 100
    # Only for ``module``: ``_target_`` nodes of the train and test sets (any map-style
    # torch Dataset of (image tensor, int label), e.g. a torchvision class or ImageFolder).
    train: Any = None
    test: Any = None


@dataclass
class ArchConfig:
    """A ResNet of Table I (SPEC.md); ``name`` is the label written to the results."""

    name: str = "digits"
    kind: str = "fc"  # fc | conv
    width: int = 256  # fc: hidden width (layer-0 dimension)
    blocks: int = 10  # fc: number of studied residual blocks
    # conv: [[channels, spatial size, blocks], ...]; the last stage is the studied one.
    stages: list[list[int]] = field(default_factory=list)
    block: str = "preact_bn"
    # kind=module: any nn.Module from a ``_target_`` node; the studied layers (module names
    # or globs such as ``layer4.*``, forward order) and the final nn.Linear (NC3, NC4).
    model: Any = None
    layers: list[str] = field(default_factory=list)
    classifier: str = ""
    # task=measure: this project's checkpoint.pt, or a plain state_dict of the model.
    checkpoint: str | None = None


@dataclass
class MeasureConfig:
    """task=measure: the split whose features the metric engine measures."""

    split: str = "train"


@dataclass
class LossConfig:
    name: str = "ce"


@dataclass
class OptimConfig:
    """SGD with step decay (SPEC.md recipe: lr / 10 at epochs 117 and 233 of 350)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Decay points as fractions of train.epochs: round(350/3) = 117, round(700/3) = 233.
    decay_at: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    gamma: float = 0.1


@dataclass
class LamConfig:
    """Surrogate regularisation: λ_W on W, λ on H - X (MUFM) or H (UFM)."""

    lam: float = 0.001
    lam_w: float = 0.005
    # When non-empty, every λ here is solved in one batched job (overrides ``lam``).
    grid: list[float] = field(default_factory=list)


@dataclass
class SurrogateConfig:
    """MUFM / UFM solver settings (paper section IV-B; SPEC.md 'MUFM and UFM')."""

    num_classes: int = 5
    dim: int = 20
    n_per_class: int = 100
    steps: int = 50_000
    lr: float = 0.1
    log_every: int = 1000
    # per_sample (SPEC choice: H lr = lr * K n) or mean (the plain mean-scaled gradient).
    h_step: str = "per_sample"
    # Stability guard on the H step: min(step, 1.9 / (curv * sigma_max(W)^2 + lam)). It only
    # shortens the first steps from the N(0,1) init, which otherwise diverge for about half
    # of the seeds at lr 0.1 (seed 0 included); false gives plain GD.
    h_step_guard: bool = True


@dataclass
class TrainConfig:
    epochs: int = 350
    batch_size: int = 128
    metrics_every: int = 1
    # Geodesic curves (Fig. 3) at this many t in [0, 1]: every metrics epoch, or only the last.
    geodesic_points: int = 101
    geodesic_every_metrics: bool = True
    # Features of all layers are cached for a one-pass metrics step up to this size.
    cache_gb: float = 4.0
    eval_batch_size: int = 1000
    device: str = "auto"
    num_threads: int = 0  # 0: leave torch's default
    # Training sets bigger than this (as float32 tensors) stream through a DataLoader.
    data_gb: float = 8.0
    num_workers: int = 0  # DataLoader workers of the streaming path


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "pfc-sweeps"
    entity: str | None = None
    # offline unless the user says otherwise; WANDB_MODE in the environment wins.
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lam: LamConfig = field(default_factory=LamConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    # Free-form label of an experiment preset (``experiment=paper_fig4`` sets it).
    experiment: str | None = None


def _linspace(start: float, stop: float, num: int) -> list[float]:
    """``${linspace:a,b,n}``: n evenly spaced values from a to b inclusive (a λ grid)."""
    num = int(num)
    if num < 1:
        raise ConfigError(f"linspace num={num!r} is invalid: must be >= 1")
    if num == 1:
        return [float(start)]
    step = (float(stop) - float(start)) / (num - 1)
    return [float(start) + i * step for i in range(num)]


def register_configs() -> None:
    """Register the schema (as ``base_config``) and the ``linspace`` resolver."""
    OmegaConf.register_new_resolver("linspace", _linspace, replace=True)
    ConfigStore.instance().store(name="base_config", node=Config)


# --------------------------------------------------------------------------- validation


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(key, value, value in choices, f"allowed values are {', '.join(choices)}")


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _positive_int(key: str, value: Any) -> None:
    _check(key, value, isinstance(value, int) and value > 0, "must be an integer > 0")


def validate(cfg: DictConfig | Config) -> Config:
    """Check every value's range; return the typed :class:`Config`.

    Raises :class:`ConfigError` (one line, naming the key) on the first bad value.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)  # resolves interpolations, builds the dataclasses
    assert isinstance(cfg, Config)
    t, d, a, o, lam, s, tr, lg = (
        cfg.task,
        cfg.dataset,
        cfg.arch,
        cfg.optim,
        cfg.lam,
        cfg.surrogate,
        cfg.train,
        cfg.logger,
    )
    _one_of("task.name", t.name, TASKS)
    for i, m in enumerate(t.models):
        _one_of(f"task.models[{i}]", m, SURROGATE_MODELS)
    if t.name in SURROGATE_MODELS:
        _check("task.models", list(t.models), len(t.models) > 0, "list at least one of mufm, ufm")
    _one_of("loss.name", cfg.loss.name, LOSSES)
    _check("seed", cfg.seed, cfg.seed >= 0, "must be >= 0")

    # λ group (used by the surrogate tasks; checked always so a typo never waits for a job)
    _check("lam.lam", lam.lam, _finite(lam.lam) and lam.lam >= 0, "must be a finite number >= 0")
    _check(
        "lam.lam_w",
        lam.lam_w,
        _finite(lam.lam_w) and lam.lam_w >= 0,
        "must be a finite number >= 0",
    )
    for i, v in enumerate(lam.grid):
        _check(f"lam.grid[{i}]", v, _finite(v) and v >= 0, "must be a finite number >= 0")

    # surrogate
    _check("surrogate.num_classes", s.num_classes, s.num_classes >= 2, "must be >= 2 (K >= 2)")
    _check(
        "surrogate.dim",
        s.dim,
        s.dim >= s.num_classes - 1,
        f"must be >= num_classes - 1 = {s.num_classes - 1} (d >= K-1)",
    )
    _positive_int("surrogate.n_per_class", s.n_per_class)
    _positive_int("surrogate.steps", s.steps)
    _positive_int("surrogate.log_every", s.log_every)
    _check("surrogate.lr", s.lr, _finite(s.lr) and s.lr > 0, "must be a finite number > 0")
    _one_of("surrogate.h_step", s.h_step, H_STEPS)

    # data, model, optimiser, training
    _one_of("dataset.name", d.name, DATASETS)
    if d.n_per_class is not None:
        _positive_int("dataset.n_per_class", d.n_per_class)
    _check("dataset.num_classes", d.num_classes, d.num_classes >= 2, "must be >= 2")
    _check("dataset.dim", d.dim, d.dim >= d.num_classes - 1, "must be >= dataset.num_classes - 1")
    _check("dataset.sigma", d.sigma, _finite(d.sigma) and d.sigma >= 0, "must be >= 0")
    _positive_int("dataset.n_train_per_class", d.n_train_per_class)
    _positive_int("dataset.n_test_per_class", d.n_test_per_class)
    _one_of("arch.kind", a.kind, ARCH_KINDS)
    _one_of("arch.block", a.block, BLOCKS)
    _validate_module(cfg)
    if a.kind == "fc":
        _positive_int("arch.width", a.width)
        _positive_int("arch.blocks", a.blocks)
    elif a.kind == "conv":
        _check(
            "arch.stages", a.stages, len(a.stages) > 0, "a conv arch needs [[C, size, blocks], ...]"
        )
        for i, st in enumerate(a.stages):
            ok = len(st) == 3 and all(isinstance(x, int) and x > 0 for x in st)
            _check(f"arch.stages[{i}]", list(st), ok, "must be [channels, size, blocks], all > 0")
    _one_of("optim.name", o.name, OPTIMIZERS)
    _check("optim.lr", o.lr, _finite(o.lr) and o.lr > 0, "must be a finite number > 0")
    _check("optim.momentum", o.momentum, 0 <= o.momentum < 1, "must be in [0, 1)")
    _check("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0")
    _check("optim.gamma", o.gamma, 0 < o.gamma <= 1, "must be in (0, 1]")
    for i, f in enumerate(o.decay_at):
        _check(f"optim.decay_at[{i}]", f, 0 < f < 1, "must be a fraction of train.epochs in (0, 1)")
    _positive_int("train.epochs", tr.epochs)
    _positive_int("train.batch_size", tr.batch_size)
    _positive_int("train.metrics_every", tr.metrics_every)
    _positive_int("train.eval_batch_size", tr.eval_batch_size)
    _check("train.geodesic_points", tr.geodesic_points, tr.geodesic_points >= 0, "must be >= 0")
    _check("train.cache_gb", tr.cache_gb, tr.cache_gb >= 0, "must be >= 0")
    _one_of("train.device", tr.device, DEVICES)
    _check("train.num_threads", tr.num_threads, tr.num_threads >= 0, "must be >= 0")

    _check("train.data_gb", tr.data_gb, tr.data_gb >= 0, "must be >= 0")
    _check("train.num_workers", tr.num_workers, tr.num_workers >= 0, "must be >= 0")
    _one_of("measure.split", cfg.measure.split, MEASURE_SPLITS)

    _one_of("logger.name", lg.name, LOGGERS)
    _one_of("logger.mode", lg.mode, WANDB_MODES)
    return cfg


def _is_target(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("_target_"), str)


def _validate_module(cfg: Config) -> None:
    """The keys of ``arch=module``, ``dataset=module`` and ``task=measure``."""
    a, d = cfg.arch, cfg.dataset
    need = "a node with a _target_ (module.Class or module.function)"
    if a.kind == "module":
        _check("arch.model", a.model, _is_target(a.model), need)
        _check("arch.layers", list(a.layers), len(a.layers) > 0, "list >= 1 module name or glob")
        _check("arch.classifier", a.classifier, bool(a.classifier), "name the final nn.Linear")
    if d.name == "module":
        _check("dataset.train", d.train, _is_target(d.train), need)
        _check("dataset.test", d.test, _is_target(d.test), need)
    if cfg.task.name == "measure":
        ok = bool(a.checkpoint)
        _check("arch.checkpoint", a.checkpoint, ok, "task=measure needs a checkpoint file")
