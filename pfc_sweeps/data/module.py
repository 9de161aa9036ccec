"""``dataset=module``: any map-style data set built from ``_target_`` nodes (``dataset.train``, ``dataset.test``).

It is read into the same tensors as the built-in sets when it fits ``train.data_gb``, and otherwise streamed through a ``DataLoader`` (:class:`~pfc_sweeps.data.bundles.StreamBundle`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from pfc_sweeps.data.builtin import balanced_subset
from pfc_sweeps.data.bundles import DataBundle, DatasetNotFound, StreamBundle

# ----------------------------------------------------------------------------- dataset=module


class DatasetSpecError(DatasetNotFound):
    """``dataset.train``/``dataset.test`` cannot be built or is not a usable data set."""


def _instantiate(node: Mapping, key: str) -> torch.utils.data.Dataset:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        ds = instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__ or e
        msg = " ".join(str(cause).split())[:200]
        raise DatasetSpecError(
            f"{key}._target_={node.get('_target_')!r} could not be built: {msg}"
        ) from None
    if isinstance(ds, torch.utils.data.IterableDataset) or not (
        hasattr(ds, "__len__") and hasattr(ds, "__getitem__")
    ):
        raise DatasetSpecError(
            f"{key}: {type(ds).__name__} is not a map-style data set (needs __len__ and "
            "__getitem__ returning (image tensor, int label))"
        )
    return ds


def _labels(ds: torch.utils.data.Dataset) -> Tensor:
    """(N,) int64 labels: the ``targets``/``labels`` attribute, else read item by item."""
    for attr in ("targets", "labels"):
        if hasattr(ds, attr) and getattr(ds, attr) is not None:
            return torch.as_tensor(np.asarray(getattr(ds, attr)), dtype=torch.int64)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.int64)


def load_module_dataset(
    train: Mapping,
    test: Mapping,
    *,
    n_per_class: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    data_gb: float = 8.0,
    num_workers: int = 0,
) -> DataBundle | StreamBundle:
    """Any map-style data set from ``_target_`` nodes (a torchvision class, ImageFolder...).

    The class count is ``len(train.classes)`` when the set has ``classes``, else the largest
    label + 1. When the training set as float32 tensors is at most ``data_gb`` GiB it is
    read once into a :class:`DataBundle`; otherwise a :class:`StreamBundle` reads it batch
    by batch. Both collate the same items the same way, so they give the same batches.
    """
    device = torch.device(device)
    train_set, test_set = _instantiate(train, "dataset.train"), _instantiate(test, "dataset.test")
    train_y = _labels(train_set)
    classes = getattr(train_set, "classes", None)
    k = len(classes) if classes else int(train_y.max()) + 1
    if n_per_class is not None:
        keep = balanced_subset(train_y, int(n_per_class), k, seed)
        train_set = torch.utils.data.Subset(train_set, keep.tolist())
    x0 = train_set[0][0]
    if not isinstance(x0, Tensor):
        raise DatasetSpecError(
            f"dataset.train items are ({type(x0).__name__}, label); add a transform that "
            "gives a tensor, e.g. torchvision.transforms.ToTensor"
        )
    in_shape = tuple(x0.shape)
    stream = StreamBundle(train_set, test_set, k, in_shape, "module", device, num_workers)
    if len(train_set) * math.prod(in_shape) * 4 > data_gb * 2**30:
        return stream
    parts = [_materialise(stream, split) for split in ("train", "test")]
    (train_x, train_y), (test_x, test_y) = parts
    return DataBundle(train_x, train_y, test_x, test_y, k, in_shape, "module")


def _materialise(stream: StreamBundle, split: str, batch: int = 512) -> tuple[Tensor, Tensor]:
    """The split read on the CPU into preallocated tensors (one copy of the data at any time,
    not the batches plus their concatenation), then moved to the stream's device once.

    Returns x (N, *in_shape) float32 and y (N,) int64 on ``stream.device``.
    """
    n = stream.size(split)
    x = torch.empty((n, *stream.in_shape), dtype=torch.float32)  # (N, *in_shape)
    y = torch.empty(n, dtype=torch.int64)  # (N,)
    on_cpu = dataclasses.replace(stream, device=torch.device("cpu"))
    start = 0
    for xb, yb in on_cpu.batches(split, torch.arange(n), batch):
        x[start : start + len(yb)] = xb
        y[start : start + len(yb)] = yb
        start += len(yb)
    return x.to(stream.device), y.to(stream.device)
