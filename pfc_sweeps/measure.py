"""The metric engine over a network's layers, and the ``task=measure`` job.

:func:`collapse_table` feeds the features of every studied layer to
:class:`~pfc_sweeps.tracker.CollapseTracker` and returns the per-layer table and the
geodesic curves. Studied layers may differ in shape (``arch=module``):

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

``task=measure`` loads ``arch.checkpoint`` and writes these rows for ``measure.split``, as a
training epoch does; for a checkpoint of this project's training, the rows equal the
training job's last-epoch rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from .build import build_data, build_net, load_weights, resolve_device
from .config import Config, TrainConfig
from .data import DataBundle, StreamBundle
from .features import FeatureNet
from .loggers import RunLogger
from .metrics import effective_depth
from .results import ResultsSink, print_summary
from .schema import EFFECTIVE_DEPTH, LAST_LAYER_METRICS, PFC3, PFC_METRICS, RUN_LAYER
from .tracker import CollapseTracker

__all__ = ["collapse_table", "geodesic_ts", "print_final", "record_metrics", "run_measure"]

Data = DataBundle | StreamBundle


def geodesic_ts(tr: TrainConfig) -> Tensor | None:
    """The t grid of the geodesic curves (``train.geodesic_points``; None: no curves)."""
    if not tr.geodesic_points:
        return None
    return torch.linspace(0, 1, tr.geodesic_points, dtype=torch.float64)


def _features(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Studied features [(B, *shape_l)] and the classifier's input (B, d_c)."""
    if isinstance(model, FeatureNet):
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
    ) -> None:
        self.s = s = _run_start(feats)
        last = feats[-1].flatten(1)
        self.own_clf = clf_in.shape == last.shape and bool(torch.equal(clf_in, last))
        dims = [h[0].numel() for h in feats] + [0 if self.own_clf else clf_in.shape[1]]
        budget = [int(cache_bytes * d / sum(dims)) for d in dims]
        w, b = model.classifier.weight, model.classifier.bias
        self.head = [CollapseTracker(k, cache_bytes=budget[i]) for i in range(s)]
        self.run = CollapseTracker(
            k,
            geodesic_ts=ts if len(feats) - s >= 2 else None,
            cache_bytes=sum(budget[s:-1]),
            classifier_weight=w if self.own_clf else None,
            classifier_bias=b if self.own_clf else None,
        )
        self.clf = (
            None
            if self.own_clf
            else CollapseTracker(k, cache_bytes=budget[-1], classifier_weight=w, classifier_bias=b)
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metric engine over ``split`` in eval mode: (per-layer table, geodesic curves).

    One forward pass when all layers' features fit ``cache_bytes``; two otherwise.
    """
    model.eval()
    order = torch.arange(data.size(split))
    trackers: _Trackers | None = None
    active: list[CollapseTracker] = []
    for _ in range(2):
        for x, y in data.batches(split, order, batch):
            feats, clf_in = _features(model, x)
            if trackers is None:
                trackers = _Trackers(model, feats, clf_in, num_classes, geodesic_ts, cache_bytes)
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


def record_metrics(
    sink: ResultsSink, table: pd.DataFrame, curves: pd.DataFrame, epoch: int, split: str
) -> pd.DataFrame:
    """Hand ``curves`` to the sink (``curves.parquet``, which the W&B logger draws from);
    return ``table`` as result rows of ``epoch``."""
    if len(curves):
        sink.add_curves(curves, epoch=epoch)
    return table.assign(epoch=epoch, split=split)


def print_final(table: pd.DataFrame, path: Path) -> None:
    rows = table[table["metric"].isin(PFC_METRICS) & (table["layer"] >= 0)]
    rel = rows["rel_pos"].map(lambda v: "-" if math.isnan(v) else f"{v:.4g}")
    rows = rows.assign(rel_pos=rel)  # layers outside the path run have no rel_pos
    title = "Per-layer collapse at the last epoch (PFC1 = Tr S_W / Tr S_B, PFC2 = ETF distance, PFC3 = NCC acc):"
    print_summary(rows, ["layer", "rel_pos"], title, path)


def run_measure(cfg: Config, out_dir: Path, sink: ResultsSink, logger: RunLogger) -> None:
    """``task=measure``: the metric rows of ``arch.checkpoint`` on ``measure.split``."""
    del out_dir  # the rows go through the sink
    tr = cfg.train
    device = resolve_device(tr.device)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, device)
    net = build_net(cfg.arch, data.in_shape, data.num_classes).to(device)
    assert cfg.arch.checkpoint is not None  # config.validate
    epoch = load_weights(net, cfg.arch.checkpoint, device)
    split = cfg.measure.split
    table, curves = collapse_table(
        net,
        data,
        split,
        data.num_classes,
        geodesic_ts=geodesic_ts(tr),
        cache_bytes=int(tr.cache_gb * 2**30),
        batch=tr.eval_batch_size,
    )
    rows = record_metrics(sink, table, curves, epoch, split)
    sink.add(rows)
    logger.log_rows(rows, step=epoch)
    print_final(table, sink.path)
