"""pfc-sweeps: progressive feedforward collapse metrics, ResNet training and UFM/MUFM sweeps.

Modules: ``metrics`` (PFC1-3, NC1-4, depth coordinate, geodesic curves, straightness),
``tracker`` (streaming all-layer tracker), ``surrogate`` (MUFM/UFM solvers), ``data``,
``models`` (Table I), ``train``, ``config`` (Hydra schema), ``results`` (parquet sink),
``loggers`` (W&B), ``tasks`` (what ``launch.py`` runs).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
