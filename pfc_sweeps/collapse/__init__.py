"""The metric engine: PFC1-3, NC1-4, the depth coordinate, the geodesic prediction and the
path's straightness (docs/metrics.md), as one-shot functions and as a streaming tracker.

- :mod:`.metrics`: one-shot functions on all features at once (the float64 reference);
- :mod:`.stats`: the sufficient-statistics algebra they and the tracker share, and
  :mod:`.geodesic`: the geodesic prediction from the first and last layers' statistics;
- :mod:`.inputs`: input checks, errors and work-chunk sizes;
- :mod:`.kernels`, :mod:`.accumulators`, :mod:`.core`, :mod:`.table`, :mod:`.tracker`: the
  streaming tracker (:class:`~pfc_sweeps.collapse.tracker.CollapseTracker`: layers of any
  shapes; :mod:`.core`: one run of layers; :mod:`.distributed`: its exact all-reduce);
- :mod:`.network`: the tracker over a network's studied layers (what ``train`` and
  ``measure`` share);
- :mod:`.allocator`: keeps freed CPU memory between metric passes.

Depends on torch and :mod:`pfc_sweeps.results.schema` (the metric names) only: no Hydra, no
W&B, no job code (checked by import-linter, ``pyproject.toml``).
"""
