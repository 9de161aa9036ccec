"""In-memory and streamed data sets as the jobs batch them (:class:`DataBundle`, :class:`StreamBundle`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pfc_sweeps.choices import DATASETS

DATASET_NAMES: tuple[str, ...] = tuple(n for n in DATASETS if n != "module")

#: Per-channel (mean, std) of the [0, 1]-scaled training pixels (the usual constants).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}

#: Folder (relative to ``root``) that torchvision expects for each data set.
TORCHVISION_FOLDERS: dict[str, str] = {
    "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}

_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}


class DatasetNotFound(FileNotFoundError):
    """The files of a data set are missing (or could not be downloaded).

    ``str(err)`` is a single line naming the expected path and how to get the files.
    """


@dataclass
class DataBundle:
    """A whole data set as tensors on one device.

    ``train_x`` (N, *in_shape) float32, ``train_y`` (N,) int64, ``test_x`` (M, *in_shape),
    ``test_y`` (M,); ``in_shape`` excludes the batch dimension.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_shape: tuple[int, ...]
    name: str
    #: When the inputs were checked finite ("when loaded"); "" if never.
    checked: str = ""

    def size(self, split: str) -> int:
        return len(self.train_y if split == "train" else self.test_y)

    def batches(self, split: str, order: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x (B, *in_shape), y (B,)) of the samples ``order`` (N,), ``batch`` at a time."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        for idx in order.to(y.device).split(batch):
            yield x[idx], y[idx]


@dataclass
class StreamBundle:
    """A data set read item by item through a ``DataLoader`` (see :func:`load_module_dataset`).

    Same interface as :class:`DataBundle`: :meth:`batches` yields the batches of the given
    index tensors, collated from the items exactly as the in-memory path stacks them.
    """

    train_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset
    num_classes: int
    in_shape: tuple[int, ...]
    name: str
    device: torch.device
    num_workers: int = 0
    #: When the inputs are checked finite ("as the first epoch read them"); "" if never.
    checked: str = ""

    def size(self, split: str) -> int:
        return len(self.train_set if split == "train" else self.test_set)

    def batches(self, split: str, order: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x (B, *in_shape), y (B,)) of the samples ``order`` (N,), ``batch`` at a time."""
        ds = self.train_set if split == "train" else self.test_set
        return _stream(ds, order.cpu().split(batch), self.device, self.num_workers)


def _stream(
    ds: torch.utils.data.Dataset,
    index: Sequence[torch.Tensor],
    device: torch.device,
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    from torch.utils.data import DataLoader

    loader = DataLoader(
        ds,
        batch_sampler=[i.tolist() for i in index],
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # its own generator: iterating must not draw from the global RNG (model init,
        # dropout, the checkpointed RNG state) or the two paths would differ
        generator=torch.Generator().manual_seed(0),
    )
    for x, y in loader:
        yield (
            x.to(device, torch.float32, non_blocking=True),
            torch.as_tensor(y).to(device, torch.int64, non_blocking=True),
        )


# ----------------------------------------------------------------------------- several ranks


def eval_shard(order: Tensor, batch: int, rank: int, world: int) -> Tensor:
    """This rank's samples of a pass over ``order`` (N,) split among ``world`` ranks.

    The pass's batches of ``batch`` (those a single process forms) go to the ranks in turn,
    so every sample is seen once, in the very batch the single process puts it in (its
    features, hence the metrics, are computed alike). With fewer batches than ranks the
    order is cut into ``world`` contiguous parts instead. No sample is dropped or repeated
    for any N; a part is empty only when N < ``world``.

    Args:
        order: (N,) sample indices.
        batch: the pass's batch size.
        rank, world: this process's rank and the number of ranks.

    Returns:
        (N_r,) this rank's indices, whose split by ``batch`` gives its batches.
    """
    chunks = order.split(batch)
    if len(chunks) < world:
        return order.tensor_split(world)[rank]
    mine = chunks[rank::world]  # only the last chunk of the pass may be short, and it is last
    return torch.cat(mine)


def train_shares(order: Tensor, batch: int, rank: int, world: int) -> list[Tensor]:
    """This rank's share of each global batch of ``order`` (N,), ``batch`` at a time.

    Every rank draws the same ``order`` (one seeded permutation), cuts it into the global
    batches a single process uses and takes its contiguous part of each (sizes differ by
    at most one), so the union of the ranks' shares is the single process's batch.

    Returns:
        One (B_r,) index tensor per global batch.
    """
    return [g.tensor_split(world)[rank] for g in order.split(batch)]


def index_batches(
    data: object, split: str, parts: Sequence[Tensor]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x (B_i, *in_shape), y (B_i,)) of the samples ``parts[i]``, one batch per part.

    Args:
        data: a :class:`DataBundle`, :class:`StreamBundle` (one ``DataLoader`` for all
            parts) or any object with ``batches(split, order, batch)``.
        split: "train" or "test".
        parts: index tensors (B_i,).

    Returns:
        An iterator of the batches, in the order of ``parts``.
    """
    if isinstance(data, StreamBundle):
        ds = data.train_set if split == "train" else data.test_set
        yield from _stream(ds, [p.cpu() for p in parts], data.device, data.num_workers)
        return
    for idx in parts:
        yield from data.batches(split, idx, max(len(idx), 1))  # type: ignore[attr-defined]


class ShardedData:
    """A data set as one rank of ``world`` sees it in a sharded pass (:func:`eval_shard`).

    :meth:`size` is the whole split's size; :meth:`batches` yields this rank's batches only,
    so that sums over them, added over the ranks, are the single-process sums. Every other
    attribute (``num_classes``, ``in_shape``...) is the wrapped data's.
    """

    def __init__(self, data: object, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __getattr__(self, name: str) -> object:
        return getattr(self.__dict__["data"], name)

    def size(self, split: str) -> int:
        return self.data.size(split)  # type: ignore[attr-defined]

    def batches(self, split: str, order: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(x (B, *in_shape), y (B,)) of this rank's batches of ``order`` (N,)."""
        mine = eval_shard(order, batch, self.rank, self.world)
        return self.data.batches(split, mine, batch)  # type: ignore[attr-defined]
