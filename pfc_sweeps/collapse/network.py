"""The metric engine over a network's studied layers: :func:`collapse_table`.

It feeds the features of every studied layer to
:class:`~pfc_sweeps.collapse.tracker.CollapseTracker`, which handles layers of any shapes
(per-layer metrics for every layer, path quantities over the trailing equal-shape run; see its
module docstring), and returns the per-layer table and the geodesic curves. NC3/NC4 use the
classifier's weights and the features that enter the classifier: when those are the last
studied layer's features (the built-in nets) they are that layer's; otherwise (e.g. a ResNet's
pooled features) they are fed as ``classifier_input`` and reported at the last layer index.
A trailing run of a single layer has no geodesic curves (``geodesic_ts`` is dropped).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pandas as pd
import torch
from torch import Tensor, nn

from pfc_sweeps.collapse.tracker import CollapseTracker, run_start


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


def _own_classifier(feats: list[Tensor], clf_in: Tensor) -> bool:
    """Whether the classifier reads the last studied layer's features (else its input is
    tracked on its own, for NC3/NC4)."""
    last = feats[-1].flatten(1)
    return clf_in.shape == last.shape and bool(torch.equal(clf_in, last))


@torch.no_grad()
def feature_width(model: nn.Module, x: Tensor) -> int:
    """Numbers per sample that the metric pass tracks (and would cache): Σ_l d_l over the
    studied layers, plus the classifier's input when it is not the last layer's features.

    Args:
        model: the network, in the mode the pass uses (eval).
        x: (B, ...) a batch of at least one input.

    Returns:
        The width Σ d (per sample).
    """
    feats, clf_in = _features(model, x)
    own = _own_classifier(feats, clf_in)
    return sum(h[0].numel() for h in feats) + (0 if own else clf_in[0].numel())


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
    precision: str = "auto",
    process_group: object = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metric engine over ``split`` in eval mode: (per-layer table, geodesic curves).

    One forward pass when all layers' features fit ``cache_bytes``; two otherwise.
    ``precision`` is the tracker's (``"float64"``: the exact path for any feature dtype).
    With a ``process_group`` (torch.distributed), ``data`` is this rank's shard: the
    trackers all-reduce their sums and every rank returns the table of all shards.
    """
    model.eval()
    order = torch.arange(data.size(split))
    tracker: CollapseTracker | None = None
    own_clf = True
    for _ in range(2):
        for x, y in data.batches(split, order, batch):
            feats, clf_in = _features(model, x)
            if tracker is None:
                tracker, own_clf = _tracker(
                    model, feats, clf_in, num_classes, geodesic_ts, cache_bytes,
                    precision, process_group,
                )  # fmt: skip
            tracker.update(feats, y, None if own_clf else clf_in)
        tracker.end_pass()
        if not tracker.needs_second_pass:
            break
    assert tracker is not None
    res = tracker.compute()
    return res.table, res.curves


def _tracker(
    model: nn.Module,
    feats: list[Tensor],
    clf_in: Tensor,
    num_classes: int,
    ts: Tensor | None,
    cache_bytes: int,
    precision: str,
    group: object,
) -> tuple[CollapseTracker, bool]:
    """The tracker of this measurement, and whether the classifier's input is the last
    layer's features (else it is fed as ``classifier_input``)."""
    own_clf = _own_classifier(feats, clf_in)
    path = len(feats) - run_start([h.shape[1:] for h in feats]) >= 2
    tracker = CollapseTracker(
        num_classes,
        geodesic_ts=ts if path else None,
        cache_bytes=cache_bytes,
        classifier_weight=model.classifier.weight,
        classifier_bias=model.classifier.bias,
        precision=precision,
        process_group=group,
    )
    return tracker, own_clf
