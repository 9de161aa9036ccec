"""pfc-sweeps: progressive feedforward collapse metrics, ResNet training and UFM/MUFM sweeps.

Subpackages, one per concern (README, "Project structure"):
``collapse`` (the metric engine and its streaming tracker), ``surrogate`` (MUFM/UFM),
``nets`` (Table I ResNets, hooks for any ``nn.Module``), ``data`` (data sets),
``jobs`` (running one job: checks, job dir, tasks, checkpoints, Hydra callbacks) and
``results`` (the tables' format, sinks, loggers, W&B charts, figures).
``config`` is the typed Hydra schema and ``choices`` its allowed values.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
