"""Streaming per-layer collapse tracker (paper Fig. 2-3): the public API and the table.

Usage::

    tracker = CollapseTracker(num_classes, geodesic_ts=torch.linspace(0, 1, 101))
    for x, y in batches:                       # pass 1
        logits, feats = model(x)
        tracker.update(feats, y)               # feats: list of (B, *shape_l), layers 0..L
    tracker.end_pass()
    if tracker.needs_second_pass:              # the features did not fit `cache_bytes`
        for x, y in batches:                   # same samples, any order / batching
            tracker.update(model(x)[1], y)
        tracker.end_pass()
    result = tracker.compute()                 # result.table, result.curves

Layers may differ in shape (docs/metrics.md "Layers of different shapes"): every layer gets its
per-layer metrics (PFC1-3, NC1, NC2, traces); the path quantities (``rel_pos``, geodesic curves
and errors, straightness, energy ratio, transport cost, Thm. 1 inner product) are computed over
the *trailing run* of layers of equal shape, and the layers before it get ``rel_pos`` NaN; NC3
and NC4 are measured on ``classifier_input`` when given (reported at the last layer), else on
the last layer; the effective depth is taken over all layers. Each leading layer, the run and a
separate classifier input have their own :class:`~pfc_sweeps.collapse.core.LayerRunTracker`,
sharing ``cache_bytes`` in proportion to their widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from torch import Tensor

from pfc_sweeps.collapse.core import (
    PRECISIONS,
    CollapseResult,
    LayerRunTracker,
    TrackerStateError,
    _check_same_batch,
    _flatten_layers,
)
from pfc_sweeps.collapse.inputs import MetricInputError
from pfc_sweeps.collapse.metrics import effective_depth
from pfc_sweeps.results.schema import EFFECTIVE_DEPTH, LAST_LAYER_METRICS, PFC3, RUN_LAYER

__all__ = ["PRECISIONS", "CollapseResult", "CollapseTracker", "TrackerStateError", "run_start"]


def run_start(shapes: Sequence[Sequence[int]]) -> int:
    """Index of the first layer of the trailing run of layers of equal shape.

    Args:
        shapes: per-layer feature shapes without the batch axis.

    Returns:
        s such that shapes[s:] are all equal and shapes[s - 1] differs (0 if all are equal).
    """
    s = len(shapes) - 1
    while s > 0 and tuple(shapes[s - 1]) == tuple(shapes[-1]):
        s -= 1
    return s


class CollapseTracker:
    """Streaming PFC/NC metrics of all layers, of any shapes (the protocol: module docstring).

    Args:
        num_classes: K >= 2.
        geodesic_ts: t in [0, 1] of the geodesic curves h(t) = (1-t) h_s + t h_L between the
            first and the last layer of the trailing equal-shape run (None: no curves, no
            geodesic_err_*; else the run must have >= 2 layers).
        cache_bytes: budget for caching one pass's features (0: two passes).
        epsilon: NCC-error threshold of the effective depth.
        classifier_weight: (K, d_c), with classifier_bias (K,): NC3/NC4.
        precision: one of PRECISIONS (docs/precision.md).
        process_group: None, or a torch.distributed ProcessGroup whose ranks each feed a shard
            of the data (docs/metrics.md "Distributed use").

    Raises:
        MetricInputError: an argument out of range (at construction) or features that do not
            fit them (at the first update).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        geodesic_ts: Tensor | Sequence[float] | None = None,
        cache_bytes: int = 2**30,
        epsilon: float = 0.01,
        classifier_weight: Tensor | None = None,
        classifier_bias: Tensor | None = None,
        precision: str = "auto",
        process_group: object = None,
    ) -> None:
        self._kw = {"epsilon": epsilon, "precision": precision, "process_group": process_group}
        self._clf = {"classifier_weight": classifier_weight, "classifier_bias": classifier_bias}
        self._ts = geodesic_ts
        # validates every argument now (a tracker of the same settings, never fed)
        probe = LayerRunTracker(
            num_classes, geodesic_ts=geodesic_ts, cache_bytes=cache_bytes, **self._clf, **self._kw
        )
        self.num_classes, self.cache_bytes, self.epsilon = num_classes, cache_bytes, probe.epsilon
        self.geodesic_ts = probe.geodesic_ts
        self._shapes: list[tuple[int, ...]] | None = None
        self._head: list[LayerRunTracker] = []
        self._run: LayerRunTracker | None = None
        self._own: LayerRunTracker | None = None  # classifier_input's tracker
        self._active: list[LayerRunTracker] = []

    @property
    def _cores(self) -> list[LayerRunTracker]:
        own = [self._own] if self._own is not None else []
        return [*self._head, *([self._run] if self._run is not None else []), *own]

    @property
    def needs_second_pass(self) -> bool:
        """True after pass 1 when some features were not cached and pass 2 is still due."""
        return any(c.needs_second_pass for c in self._cores)

    @property
    def state_bytes(self) -> int:
        """Bytes of all accumulators and work buffers, excluding the feature cache: O(L K d +
        K T), independent of the number of samples N."""
        return sum(c.state_bytes for c in self._cores)

    @property
    def cached_bytes(self) -> int:
        """Bytes of features held in the cache for pass 2."""
        return sum(c.cached_bytes for c in self._cores)

    def _setup(self, shapes: list[tuple[int, ...]], clf_width: int | None) -> None:
        """The trackers of the leading layers, the trailing run and the classifier input."""
        k, s = self.num_classes, run_start(shapes)
        dims = [math.prod(sh) for sh in shapes] + [clf_width or 0]
        budget = [int(self.cache_bytes * d / sum(dims)) for d in dims]
        if self._ts is not None and len(shapes) - s < 2:
            raise MetricInputError(
                "geodesic_ts needs >= 2 layers of one dimension at the end of the layer list "
                "(the geodesic joins the first and last layer of the trailing equal-shape run); "
                f"got layer dims {dims[:-1]}"
            )
        self._head = [LayerRunTracker(k, cache_bytes=budget[i], **self._kw) for i in range(s)]
        clf = self._clf if clf_width is None else {}
        self._run = LayerRunTracker(
            k, geodesic_ts=self._ts, cache_bytes=sum(budget[s:-1]), **clf, **self._kw
        )
        if clf_width is not None:
            self._own = LayerRunTracker(k, cache_bytes=budget[-1], **self._clf, **self._kw)
        self._shapes, self._s, self._active = shapes, s, self._cores

    def update(
        self, features: Sequence[Tensor], labels: Tensor, classifier_input: Tensor | None = None
    ) -> None:
        """Feed one batch.

        Args:
            features: list of per-layer tensors (B, *shape_l) (flattened to (B, d_l)).
            labels: (B,) integer class labels in 0..K-1.
            classifier_input: (B, d_c) the classifier's input when it is not the last layer's
                features (NC3/NC4 are then measured on it); given in every batch or in none.

        Raises:
            MetricInputError: bad features or labels, or shapes that differ from the first batch.
            TrackerStateError: fed after the last pass ended.
        """
        if (
            self._shapes is None
            and classifier_input is not None
            and self._clf["classifier_weight"] is None
        ):
            raise MetricInputError("classifier_input given without classifier_weight")
        layers = _flatten_layers(features)
        _check_same_batch(layers)
        shapes = [tuple(h.shape[1:]) for h in features]
        if self._shapes is None:
            clf_w = None if classifier_input is None else _flatten_layers([classifier_input])[0]
            self._setup(shapes, None if clf_w is None else clf_w.shape[1])
        elif shapes != self._shapes or (classifier_input is None) != (self._own is None):
            raise MetricInputError(
                f"layer shapes {shapes} (classifier_input {classifier_input is not None}) differ "
                f"from the first batch's {self._shapes} ({self._own is not None}); every batch "
                "of every pass must come from the same layers"
            )
        parts = {id(c): [layers[i]] for i, c in enumerate(self._head)}
        parts[id(self._run)] = layers[self._s :]
        if self._own is not None:
            parts[id(self._own)] = [classifier_input]
        for c in self._active or self._cores:
            c.update(parts[id(c)], labels)

    def end_pass(self) -> None:
        """Close the current pass. After pass 1 with everything cached, also run pass 2.

        Raises:
            TrackerStateError: no batch in this pass, or the last pass already ended.
        """
        if self._shapes is None:
            raise TrackerStateError("end_pass() before any update(): pass 1 saw no batches")
        for c in self._active or self._cores:
            c.end_pass()
        self._active = [c for c in self._cores if c.needs_second_pass]

    def compute(self) -> CollapseResult:
        """All metrics (valid once the last pass has ended).

        Returns:
            CollapseResult: table DataFrame[layer, rel_pos, metric, value] and curves
            DataFrame[t, metric, value] (docs/metrics.md).

        Raises:
            TrackerStateError: a pass is still open or due.
            DegenerateFeaturesError: a metric is undefined on these features.
        """
        if self._run is None:
            raise TrackerStateError("compute() too early: pass 1 is still open: call end_pass()")
        run = self._run.compute()
        if not self._head and self._own is None:
            return run
        return CollapseResult(table=self._merge(run.table), curves=run.curves)

    def _merge(self, run_table: pd.DataFrame) -> pd.DataFrame:
        """One table over all layers from the head, run and classifier-input trackers."""
        table = run_table.copy()
        table.loc[table["layer"] >= 0, "layer"] += self._s
        parts = []
        for i, t in enumerate(self._head):
            head = t.compute().table
            parts.append(head[head["layer"] >= 0].assign(layer=i, rel_pos=math.nan))
        parts.append(table[table["metric"] != EFFECTIVE_DEPTH])
        if self._own is not None:
            last = len(self._shapes) - 1
            rel = table.loc[table["layer"] == last, "rel_pos"].iloc[0]
            nc = self._own.compute().table
            parts.append(nc[nc["metric"].isin(LAST_LAYER_METRICS)].assign(layer=last, rel_pos=rel))
        out = pd.concat(parts, ignore_index=True)
        pfc3 = out[out["metric"] == PFC3].sort_values("layer")["value"]
        depth = effective_depth([1.0 - v for v in pfc3], self.epsilon)
        row = pd.DataFrame(
            [(RUN_LAYER, math.nan, EFFECTIVE_DEPTH, float(depth))], columns=list(out.columns)
        )
        return pd.concat([out, row], ignore_index=True).astype(run_table.dtypes.to_dict())
