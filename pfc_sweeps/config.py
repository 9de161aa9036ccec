"""Structured configs: the typed schema of every config group, and its one validation.

The dataclasses below are registered in Hydra's ConfigStore as ``base_config``; the YAML
files under ``conf/`` only say what differs from these defaults (one source of truth per
default). The allowed-value lists (:data:`TASKS`, :data:`DATASETS`, ...) are defined here
once; the library modules import them. OmegaConf checks the types when a config or an
override is merged; :func:`validate` checks everything else before any work starts -- keys
the schema does not know, ranges, inf/NaN, ``train.device=cuda`` without CUDA -- and raises a
one-line :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pfc_sweeps.choices import (
    ARCH_KINDS,
    BLOCKS,
    DATASETS,
    DEVICES,
    DISTRIBUTED_MODES,
    H_STEPS,
    LOGGERS,
    LOSSES,
    MEASURE_SPLITS,
    METRIC_PRECISIONS,
    OPTIMIZERS,
    TASKS,
    TRAIN_PRECISIONS,
    WANDB_MODES,
)
from pfc_sweeps.results.schema import SURROGATE_MODELS

__all__ = [
    "ARCH_KINDS",
    "BLOCKS",
    "DATASETS",
    "DEVICES",
    "H_STEPS",
    "LOGGERS",
    "LOSSES",
    "MEASURE_SPLITS",
    "OPTIMIZERS",
    "SURROGATE_MODELS",
    "TASKS",
    "TRAIN_PRECISIONS",
    "WANDB_MODES",
    "ArchConfig",
    "Config",
    "ConfigError",
    "DatasetConfig",
    "GaussianConfig",
    "LamConfig",
    "LoggerConfig",
    "LossConfig",
    "MeasureConfig",
    "OptimConfig",
    "SurrogateConfig",
    "TaskConfig",
    "TrainConfig",
    "register_configs",
    "schema_keys",
    "validate",
]


class ConfigError(ValueError):
    """A config key or value is invalid; the one-line message names the key and what is allowed."""


@dataclass
class TaskConfig:
    """Which job to run: ``train`` (a ResNet) or ``surrogate`` (MUFM/UFM solves)."""

    name: str = "train"
    # surrogate: the models solved in the job, on the same data X (``paper_fig4``: both).
    models: list[str] = field(default_factory=list)


@dataclass
class GaussianConfig:
    """The Gaussian mixture of ``dataset=gaussian`` and of the surrogate tasks (docs/metrics.md "MUFM and UFM").

    K classes of N(mu_k, sigma^2 I_dim), mu_k uniform on the unit sphere of R^dim.
    """

    num_classes: int = 5
    dim: int = 20
    sigma: float = 1.0
    n_per_class: int = 100  # training samples per class (the surrogate's X)
    n_test_per_class: int = 100  # dataset=gaussian only


@dataclass
class DatasetConfig:
    """A data set (``pfc_sweeps.data``); ``root: null`` means the user cache dir."""

    name: str = "digits"
    root: str | None = None
    download: bool = True
    # Balanced, seeded subset of the training split (null: all samples).
    subset_per_class: int | None = None
    # Only for ``module``: ``_target_`` nodes of the train and test sets (any map-style
    # torch Dataset of (image tensor, int label), e.g. a torchvision class or ImageFolder).
    train: Any = None
    test: Any = None


@dataclass
class ArchConfig:
    """A ResNet of Table I; ``name`` is the label written to the results."""

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
    """SGD with step decay (paper recipe: lr / 10 at epochs 117 and 233 of 350)."""

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
    """MUFM / UFM solver settings (paper section IV-B); the data is ``gaussian.*``."""

    steps: int = 50_000
    lr: float = 0.1
    log_every: int = 1000
    # per_sample (H lr = lr * K n) or mean (the plain mean-scaled gradient).
    h_step: str = "per_sample"
    # Stability guard on the H step: min(step, 1.9 / (curv * sigma_max(W)^2 + lam)). It only
    # shortens the first steps from the N(0,1) init; false gives plain GD.
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
    # Speed options (pfc_sweeps.jobs.accel), all off by default: autocast precision of the
    # training steps (fp16 needs CUDA), NHWC conv nets, TF32 matmuls, torch.compile.
    precision: str = "fp32"
    channels_last: bool = False
    tf32: bool = False
    compile: bool = False
    deterministic: bool = True  # bit-identical resume on CUDA (conditions, cost: docs/gpu.md)
    # Several processes (auto|off), global-batch BatchNorm, etc.: docs/distributed.md
    distributed: str = "auto"
    sync_bn: bool = True
    dist_timeout_s: float = 300.0
    metric_precision: str = "auto"


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
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
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
    """Register the schema (as ``base_config``), the ``linspace`` and ``pfc_gpu_count`` resolvers."""
    from pfc_sweeps.jobs.devices import gpu_count  # hydra/launcher=local: every visible GPU

    OmegaConf.register_new_resolver("linspace", _linspace, replace=True)
    OmegaConf.register_new_resolver("pfc_gpu_count", gpu_count, replace=True)
    ConfigStore.instance().store(name="base_config", node=Config)


# ------------------------------------------------------------------------- unknown keys


def _walk(node: DictConfig, prefix: str = "") -> Iterator[str]:
    for key in node.keys():
        path = f"{prefix}{key}"
        yield path
        child = node._get_node(key)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            yield from _walk(child, f"{path}.")


def schema_keys() -> list[str]:
    """Every dotted key of the schema (``train``, ``train.epochs``, ...)."""
    return list(_walk(OmegaConf.structured(Config)))


def _unknown_keys(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key that is not in the schema (e.g. ``+train.epoch=5``)."""
    known = set(schema_keys())
    for key in _walk(cfg):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key} is not a config key{hint}")


# --------------------------------------------------------------------------- validation


def _check(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(key, value, value in choices, f"allowed values are {', '.join(choices)}")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _number(key: str, value: Any, lo: float, hi: float = math.inf, *, open_lo=False, open_hi=False):
    """A finite number in the interval lo..hi (open or closed at each end)."""
    ok = _finite(value) and (value > lo if open_lo else value >= lo)
    ok = ok and (value < hi if open_hi else value <= hi)
    left, right = "(" if open_lo else "[", ")" if open_hi or hi == math.inf else "]"
    _check(key, value, ok, f"must be a finite number in {left}{lo:.10g}, {hi:.10g}{right}")


def _positive_int(key: str, value: Any) -> None:
    _check(key, value, isinstance(value, int) and value > 0, "must be an integer > 0")


def _validate_task(cfg: Config) -> None:
    t = cfg.task
    _one_of("task.name", t.name, TASKS)
    for i, m in enumerate(t.models):
        _one_of(f"task.models[{i}]", m, SURROGATE_MODELS)
    if t.name == "surrogate":
        _check("task.models", list(t.models), len(t.models) > 0, "list at least one of mufm, ufm")
    _one_of("loss.name", cfg.loss.name, LOSSES)
    _check("seed", cfg.seed, cfg.seed >= 0, "must be >= 0")


def _validate_surrogate(cfg: Config) -> None:
    lam, s, g = cfg.lam, cfg.surrogate, cfg.gaussian
    _number("lam.lam", lam.lam, 0)
    _number("lam.lam_w", lam.lam_w, 0)
    for i, v in enumerate(lam.grid):
        _number(f"lam.grid[{i}]", v, 0)
    _positive_int("surrogate.steps", s.steps)
    _positive_int("surrogate.log_every", s.log_every)
    _number("surrogate.lr", s.lr, 0, open_lo=True)
    _one_of("surrogate.h_step", s.h_step, H_STEPS)
    _check("gaussian.num_classes", g.num_classes, g.num_classes >= 2, "must be >= 2 (K >= 2)")
    dim_ok = g.dim >= max(1, g.num_classes - 1)
    _check("gaussian.dim", g.dim, dim_ok, f"must be >= num_classes - 1 = {g.num_classes - 1}")
    _number("gaussian.sigma", g.sigma, 0)
    _positive_int("gaussian.n_per_class", g.n_per_class)
    _positive_int("gaussian.n_test_per_class", g.n_test_per_class)


def _validate_model(cfg: Config) -> None:
    d, a, o = cfg.dataset, cfg.arch, cfg.optim
    _one_of("dataset.name", d.name, DATASETS)
    if d.subset_per_class is not None:
        _positive_int("dataset.subset_per_class", d.subset_per_class)
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
    _number("optim.lr", o.lr, 0, open_lo=True)
    _number("optim.momentum", o.momentum, 0, 1, open_hi=True)
    _number("optim.weight_decay", o.weight_decay, 0)
    _number("optim.gamma", o.gamma, 0, 1, open_lo=True)
    for i, f in enumerate(o.decay_at):
        _number(f"optim.decay_at[{i}]", f, 0, 1, open_lo=True, open_hi=True)


def _validate_train(cfg: Config) -> None:
    tr, lg = cfg.train, cfg.logger
    _positive_int("train.epochs", tr.epochs)
    _positive_int("train.batch_size", tr.batch_size)
    _positive_int("train.metrics_every", tr.metrics_every)
    _positive_int("train.eval_batch_size", tr.eval_batch_size)
    _check("train.geodesic_points", tr.geodesic_points, tr.geodesic_points >= 0, "must be >= 0")
    # 2**30 * cache_gb must be a byte count: up to 1 PiB.
    _number("train.cache_gb", tr.cache_gb, 0, 2**20)
    _one_of("train.device", tr.device, DEVICES)
    _check("train.num_threads", tr.num_threads, tr.num_threads >= 0, "must be >= 0")
    _one_of("train.precision", tr.precision, TRAIN_PRECISIONS)
    if tr.device == "cuda" or tr.precision == "fp16":
        import torch

        if tr.precision == "fp16":
            cuda = tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
            _check(
                "train.precision", tr.precision, cuda, "fp16 autocast needs CUDA; use bf16 on CPU"
            )
    if tr.device == "cuda":
        _check("train.device", tr.device, torch.cuda.is_available(), "no CUDA device is available")
    _number("train.data_gb", tr.data_gb, 0, 2**20)
    _check("train.num_workers", tr.num_workers, tr.num_workers >= 0, "must be >= 0")
    _one_of("train.distributed", tr.distributed, DISTRIBUTED_MODES)
    _number("train.dist_timeout_s", tr.dist_timeout_s, 0, 7 * 86400, open_lo=True)
    _one_of("train.metric_precision", tr.metric_precision, METRIC_PRECISIONS)
    _one_of("measure.split", cfg.measure.split, MEASURE_SPLITS)
    _one_of("logger.name", lg.name, LOGGERS)
    _one_of("logger.mode", lg.mode, WANDB_MODES)


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


def validate(cfg: DictConfig | Config) -> Config:
    """Check every key and value; return the typed :class:`Config`.

    Raises :class:`ConfigError` (one line, naming the key) on the first unknown key or bad
    value. Nothing is read or written.
    """
    if isinstance(cfg, DictConfig):
        _unknown_keys(cfg)
        cfg = OmegaConf.to_object(cfg)  # resolves interpolations, builds the dataclasses
    assert isinstance(cfg, Config)
    _validate_task(cfg)
    _validate_surrogate(cfg)
    _validate_model(cfg)
    _validate_train(cfg)
    return cfg
