"""The ``task=measure`` job, and the metric rows that the training job records too.

``task=measure`` loads ``arch.checkpoint`` and writes the rows of :func:`~pfc_sweeps.collapse.network.collapse_table` for ``measure.split``, as a training epoch does; for a checkpoint of this project's training, the rows equal the training job's last-epoch rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from pfc_sweeps.collapse.inputs import MetricInputError
from pfc_sweeps.collapse.network import collapse_table
from pfc_sweeps.config import Config, TrainConfig
from pfc_sweeps.errors import PFCError
from pfc_sweeps.jobs import ddp
from pfc_sweeps.jobs.accel import configure_job, full_float32, metric_cache_bytes
from pfc_sweeps.jobs.build import build_data, build_net, load_weights, resolve_device
from pfc_sweeps.results.loggers import RunLogger
from pfc_sweeps.results.schema import (
    PFC_METRICS,
)
from pfc_sweeps.results.sink import ResultsSink, print_summary


@contextmanager
def metric_errors(split: str) -> Iterator[None]:
    """A metric the data leave undefined (a class with no sample in ``split``, all class means
    equal) stops the job with one line naming the split, not a traceback."""
    try:
        yield
    except MetricInputError as e:
        raise PFCError(f"the collapse metrics of the {split} split are undefined: {e}") from None


def geodesic_ts(tr: TrainConfig) -> Tensor | None:
    """The t grid of the geodesic curves (``train.geodesic_points``; None: no curves)."""
    if not tr.geodesic_points:
        return None
    return torch.linspace(0, 1, tr.geodesic_points, dtype=torch.float64)


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
    configure_job(tr)  # TF32 and determinism flags, before CUDA initialises
    device = resolve_device(tr.device)
    if tr.num_threads:
        torch.set_num_threads(tr.num_threads)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, device)
    net = build_net(cfg.arch, data.in_shape, data.num_classes).to(device)
    assert cfg.arch.checkpoint is not None  # config.validate
    epoch = load_weights(net, cfg.arch.checkpoint, device)
    split = cfg.measure.split
    cache = metric_cache_bytes(net, data, split, int(tr.cache_gb * 2**30), device)
    with full_float32(), metric_errors(split):  # as in training: the same rows, same weights
        table, curves = collapse_table(
            net,
            ddp.shard(data),  # several ranks: each measures its batches of the pass
            split,
            data.num_classes,
            geodesic_ts=geodesic_ts(tr),
            cache_bytes=cache,
            batch=tr.eval_batch_size,
            precision=tr.metric_precision,  # float64: the exact path
            **ddp.table_kwargs(),
        )
    rows = record_metrics(sink, table, curves, epoch, split)
    sink.add(rows)
    logger.log_rows(rows, step=epoch)
    print_final(table, sink.path)
