"""``dataset=module``: any map-style data set built from ``_target_`` nodes (``dataset.train``, ``dataset.test``).

It is read into the same tensors as the built-in sets when it fits ``train.data_gb``, and otherwise streamed through a ``DataLoader`` (:class:`~pfc_sweeps.data.bundles.StreamBundle`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from pfc_sweeps.data.builtin import balanced_subset
from pfc_sweeps.data.bundles import DataBundle, DatasetNotFound, StreamBundle
from pfc_sweeps.data.validate import (
    CheckedItems,
    check_class_names,
    check_nonempty,
    check_test_labels,
    check_train_labels,
    labels_of,
)

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


def _labels(ds: torch.utils.data.Dataset, checked: CheckedItems) -> Tensor | None:
    """(N,) int64 labels of the ``targets``/``labels`` attribute (checked), else None."""
    for attr in ("targets", "labels"):
        if hasattr(ds, attr) and getattr(ds, attr) is not None:
            return labels_of(getattr(ds, attr), checked.split, checked.where)
    return None


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
    Every item is checked as it is read (:mod:`pfc_sweeps.data.validate`): in memory, all
    before training; streamed, as the first epoch reads them.

    Raises:
        DatasetSpecError: a node cannot be built or is not a map-style data set.
        DataError: a defect of the data (one line naming the split, the item and its file).
    """
    device = torch.device(device)
    raw = _instantiate(train, "dataset.train"), _instantiate(test, "dataset.test")
    for ds, split in zip(raw, ("dataset.train", "dataset.test"), strict=True):
        check_nonempty(ds, split)
    train_c, test_c = CheckedItems(raw[0], "dataset.train"), CheckedItems(raw[1], "dataset.test")
    in_shape = tuple(train_c[0][0].shape)
    for c in (train_c, test_c):
        c.shape, c.shape_of = in_shape, "dataset.train item 0"
    train_y = _labels(raw[0], train_c)
    if train_y is None:  # read item by item (each item checked)
        train_y = torch.tensor([train_c[i][1] for i in range(len(train_c))], dtype=torch.int64)
    classes = getattr(raw[0], "classes", None)
    k = len(classes) if classes else int(train_y.max()) + 1
    src = "len(dataset.train.classes)" if classes else "the largest training label + 1"
    check_train_labels(train_y, k, src, train_c.where)
    check_class_names(classes, getattr(raw[1], "classes", None))
    for c in (train_c, test_c):
        c.num_classes, c.classes_from = k, src
    test_y = _labels(raw[1], test_c)
    if test_y is not None:
        check_test_labels(test_y, k, test_c.where)
    train_set: torch.utils.data.Dataset = train_c
    if n_per_class is not None:
        keep = balanced_subset(train_y, int(n_per_class), k, seed)
        train_set = torch.utils.data.Subset(train_c, keep.tolist())
    stream = StreamBundle(train_set, test_c, k, in_shape, "module", device, num_workers)
    if len(train_set) * math.prod(in_shape) * 4 > data_gb * 2**30:
        for c in (train_c, test_c):
            c.stage = "at the first bad item it read, before any results were written"
        stream.checked = "as the first epoch read them"
        return stream
    parts = [_materialise(stream, split) for split in ("train", "test")]
    (train_x, train_y), (test_x, test_y) = parts
    check_test_labels(test_y.cpu(), k, test_c.where)
    bundle = DataBundle(train_x, train_y, test_x, test_y, k, in_shape, "module")
    bundle.checked = "when loaded"
    return bundle


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
