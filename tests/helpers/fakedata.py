"""Tiny data sets written in torchvision's real on-disk formats (for tests; random pixels).

Labels are balanced: ``n_per_class`` images of every class in each split.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

__all__ = ["write"]

NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "stl10": 10, "cifar100": 100}


def _labels(k: int, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    lab = np.repeat(np.arange(k), n_per_class).astype(np.uint8)
    rng.shuffle(lab)
    return lab


def _idx(path: Path, array: np.ndarray) -> None:
    """idx ubyte: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, data; gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape)
    with gzip.open(f"{path}.gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _mnist(root: Path, folder: str, n: int, rng) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        lab = _labels(10, n, rng)
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (len(lab), 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", lab)


def _cifar(root: Path, hundred: bool, n: int, rng) -> dict[str, tuple[np.ndarray, list[int]]]:
    k = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    files = (
        (["train"], ["test"])
        if hundred
        else ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"])
    )
    written = {}
    for split, names in zip(("train", "test"), files, strict=True):
        lab = _labels(k, n, rng)
        img = rng.integers(0, 256, (len(lab), 3, 32, 32), dtype=np.uint8)  # (N, C, H, W)
        for fname, part in zip(names, np.array_split(np.arange(len(lab)), len(names)), strict=True):
            rows = img[part].reshape(len(part), 3072)  # a row: R plane, G plane, B plane
            with open(folder / fname, "wb") as f:
                pickle.dump({"data": rows, key: lab[part].tolist()}, f)
        written[split] = (img, lab.tolist())
    meta, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(k)]}, f)
    return written


def _stl10(root: Path, n: int, rng) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        lab = _labels(10, n, rng)
        img = rng.integers(0, 256, (len(lab), 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(img.tobytes())
        (folder / f"{split}_y.bin").write_bytes((lab + 1).astype(np.uint8).tobytes())  # 1-based
    (folder / "unlabeled_X.bin").write_bytes(b"")


def write(name: str, root: Path, n_per_class: int = 2, seed: int = 0):
    """Write data set ``name`` under ``root`` as torchvision expects to find it.

    For CIFAR returns ``{split: (images (N, 3, 32, 32) uint8, labels)}`` as written.
    """
    rng = np.random.default_rng(seed)
    if name in ("mnist", "fashion_mnist"):
        _mnist(root, "MNIST" if name == "mnist" else "FashionMNIST", n_per_class, rng)
    elif name in ("cifar10", "cifar100"):
        return _cifar(root, name == "cifar100", n_per_class, rng)
    elif name == "stl10":
        _stl10(root, n_per_class, rng)
    else:
        raise ValueError(f"unknown data set {name!r}; allowed: {sorted(NUM_CLASSES)}")


def write_image_folder(root: Path, k: int, n_per_class: int, size: int = 8, seed: int = 0) -> None:
    """``root/{train,test}/class<c>/<i>.png``: random RGB images for ``ImageFolder``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", max(1, n_per_class // 5))):
        for c in range(k):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            base = rng.integers(0, 256, (1, 1, 3))  # a class colour, plus noise
            for i in range(n):
                noise = rng.integers(-60, 61, (size, size, 3))
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
