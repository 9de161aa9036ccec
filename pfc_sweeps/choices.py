"""The allowed values of the config's choice keys, in one place (no Hydra, no torch).

:mod:`pfc_sweeps.config` validates against them; the models, data sets and solvers import them from here, so that they need no Hydra.
"""

from __future__ import annotations

#: ``task.name``: train a ResNet, or solve the surrogate models of ``task.models``.
TASKS = ("train", "surrogate", "measure")
#: ``module``: any data set from ``_target_`` nodes (``dataset.train``, ``dataset.test``).
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
#: ``module``: any nn.Module from a ``_target_`` node (``arch.model``).
ARCH_KINDS = ("fc", "conv", "module")
MEASURE_SPLITS = ("train", "test")
BLOCKS = ("relu", "mlp", "preact_bn", "mlp_bn")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
H_STEPS = ("per_sample", "per_class", "mean")
DEVICES = ("auto", "cpu", "cuda")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision (pfc_sweeps.jobs.accel)
DISTRIBUTED_MODES = ("auto", "off")  # train.distributed (pfc_sweeps.jobs.distributed)
METRIC_PRECISIONS = ("auto", "float64")  # train.metric_precision (the tracker's PRECISIONS)
