"""The metric engine over a network's studied layers: :func:`collapse_table`.

It feeds the features of every studied layer to :class:`~pfc_sweeps.collapse.tracker.CollapseTracker` and returns the per-layer table and the geodesic curves. Studied layers may differ in shape (``arch=module``):

- every layer gets its per-layer metrics (PFC1-3, NC1, NC2, traces);
- the path quantities (relative depth ``rel_pos``, geodesic curves and errors, straightness,
  energy ratio, transport cost, Thm. 1 inner product) need one dimension along the path, so
  they are computed over the *trailing run* of layers of equal shape (as paper Table I
  studies the last stage); the layers before it get ``rel_pos`` NaN and no path rows;
- NC3/NC4 use the classifier's weights and the features that enter the classifier. When
  those are the last studied layer's features (the built-in nets) they are that layer's;
  otherwise (e.g. a ResNet's pooled features) they are measured on the classifier's input
  and reported at the last layer index;
- the effective depth is taken over all studied layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import pandas as pd
import torch
from torch import Tensor, nn

from pfc_sweeps.collapse.metrics import effective_depth
from pfc_sweeps.collapse.tracker import CollapseTracker
from pfc_sweeps.results.schema import (
    EFFECTIVE_DEPTH,
    LAST_LAYER_METRICS,
    PFC3,
    RUN_LAYER,
)


class Data(Protocol):
    """A split-indexed data set as the jobs batch it (``pfc_sweeps.data.bundles``)."""

    def size(self, split: str) -> int: ...

    def batches(self, split: str, order: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]: ...


def _features(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Studied features [(B, *shape_l)] and the classifier's input (B, d_c)."""
    if hasattr(model, "extract"):  # any nn.Module (pfc_sweeps.nets.hooks.FeatureNet)
        _, feats, clf_in = model.extract(x)
        return feats, clf_in
    _, feats = model(x)
    return feats, feats[-1]


def _run_start(feats: list[Tensor]) -> int:
    """Index of the first layer of the trailing run of equal-shape layers."""
    s = len(feats) - 1
    while s > 0 and feats[s - 1].shape[1:] == feats[-1].shape[1:]:
        s -= 1
    return s


class _Trackers:
    """The trackers of one measurement: one per layer before the path run (per-layer
    metrics only), one for the run (path quantities too), one for the classifier's input
    when it is not the last layer's features (NC3, NC4)."""

    def __init__(
        self,
        model: nn.Module,
        feats: list[Tensor],
        clf_in: Tensor,
        k: int,
        ts: Tensor | None,
        cache_bytes: int,
        group: object = None,
    ) -> None:
        self.s = s = _run_start(feats)
        last = feats[-1].flatten(1)
        self.own_clf = clf_in.shape == last.shape and bool(torch.equal(clf_in, last))
        dims = [h[0].numel() for h in feats] + [0 if self.own_clf else clf_in.shape[1]]
        budget = [int(cache_bytes * d / sum(dims)) for d in dims]
        w, b = model.classifier.weight, model.classifier.bias
        self.head = [
            CollapseTracker(k, cache_bytes=budget[i], process_group=group) for i in range(s)
        ]
        self.run = CollapseTracker(
            k,
            geodesic_ts=ts if len(feats) - s >= 2 else None,
            cache_bytes=sum(budget[s:-1]),
            classifier_weight=w if self.own_clf else None,
            classifier_bias=b if self.own_clf else None,
            process_group=group,
        )
        self.clf = (
            None
            if self.own_clf
            else CollapseTracker(
                k,
                cache_bytes=budget[-1],
                classifier_weight=w,
                classifier_bias=b,
                process_group=group,
            )
        )

    def all(self) -> list[CollapseTracker]:
        return [*self.head, self.run, *([self.clf] if self.clf is not None else [])]

    def update(
        self, feats: list[Tensor], clf_in: Tensor, y: Tensor, only: list[CollapseTracker]
    ) -> None:
        parts = {id(t): [feats[i]] for i, t in enumerate(self.head)}
        parts[id(self.run)] = feats[self.s :]
        if self.clf is not None:
            parts[id(self.clf)] = [clf_in]
        for t in only:
            t.update(parts[id(t)], y)


@torch.no_grad()
def collapse_table(
    model: nn.Module,
    data: Data,
    split: str,
    num_classes: int,
    *,
    geodesic_ts: Tensor | None,
    cache_bytes: int,
    batch: int,
    process_group: object = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metric engine over ``split`` in eval mode: (per-layer table, geodesic curves).

    One forward pass when all layers' features fit ``cache_bytes``; two otherwise.
    With a ``process_group`` (torch.distributed), ``data`` is this rank's shard: the
    trackers all-reduce their sums and every rank returns the table of all shards.
    """
    model.eval()
    order = torch.arange(data.size(split))
    trackers: _Trackers | None = None
    active: list[CollapseTracker] = []
    for _ in range(2):
        for x, y in data.batches(split, order, batch):
            feats, clf_in = _features(model, x)
            if trackers is None:
                trackers = _Trackers(
                    model, feats, clf_in, num_classes, geodesic_ts, cache_bytes, process_group
                )
                active = trackers.all()
            trackers.update(feats, clf_in, y, active)
        for t in active:
            t.end_pass()
        active = [t for t in active if t.needs_second_pass]
        if not active:
            break
    assert trackers is not None
    return _merge(trackers)


def _merge(tr: _Trackers) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table over all layers from the head, run and classifier trackers."""
    run = tr.run.compute()
    if not tr.head and tr.clf is None:
        return run.table, run.curves
    table = run.table.copy()
    table.loc[table["layer"] >= 0, "layer"] += tr.s
    parts = []
    for i, t in enumerate(tr.head):
        head = t.compute().table
        parts.append(head[head["layer"] >= 0].assign(layer=i, rel_pos=math.nan))
    parts.append(table[table["metric"] != EFFECTIVE_DEPTH])
    if tr.clf is not None:
        last = int(table["layer"].max())
        rel = table.loc[table["layer"] == last, "rel_pos"].iloc[0]
        nc = tr.clf.compute().table
        parts.append(nc[nc["metric"].isin(LAST_LAYER_METRICS)].assign(layer=last, rel_pos=rel))
    out = pd.concat(parts, ignore_index=True)
    pfc3 = out[out["metric"] == PFC3].sort_values("layer")["value"]
    depth = effective_depth([1.0 - v for v in pfc3], tr.run.epsilon)
    row = pd.DataFrame(
        [(RUN_LAYER, math.nan, EFFECTIVE_DEPTH, float(depth))], columns=list(out.columns)
    )
    out = pd.concat([out, row], ignore_index=True).astype(run.table.dtypes.to_dict())
    return out, run.curves
