"""Data sets for the PFC experiments (paper section IV-A).

The built-in data sets are loaded once into memory as float tensors on the requested device
and batched by index (no DataLoader, no augmentation: neural collapse is measured on the
training set exactly as it was trained). ``dataset=module`` (:func:`load_module_dataset`)
builds any map-style data set from ``_target_`` nodes; it is read into the same tensors
when it fits ``train.data_gb``, and otherwise streamed through a ``DataLoader``
(:class:`StreamBundle`). Both give the batches of the same index order identically.

Names (see :data:`DATASET_NAMES`):

- ``mnist``, ``fashion_mnist``, ``cifar10``, ``stl10``, ``cifar100``: through the real
  torchvision classes (``torchvision.datasets.MNIST`` ...), so their file checks and
  downloads run; the pixels are then read from the dataset's ``.data`` / ``.targets``
  arrays in one vectorised step (no per-item ``__getitem__``). Pixels are scaled to
  [0, 1] and standardised per channel with the usual constants (:data:`NORMALIZATION`).
  STL10 uses the labelled ``train`` (5000) and ``test`` (8000) splits and, like the
  others, is kept as float32 tensors (about 0.55 GB train + 0.88 GB test).
- ``digits``: scikit-learn's bundled 8x8 digits (1797 samples, no download), shaped
  1x8x8; a seeded stratified 80/20 train/test split (1437 / 360); pixels scaled to
  [0, 1] (divided by 16) and then standardised with the scalar mean and std of the
  train split.
- ``gaussian``: the MUFM data (paper section IV-B): class means mu_k drawn
  uniformly on the unit sphere of R^d, samples x ~ N(mu_k, sigma^2 I_d); ``n`` train
  and ``n_test`` test samples per class, in_shape ``(d,)``, no normalisation.

``n_per_class`` keeps a balanced, seeded subset of the train split (the test split is
kept whole). ``seed`` drives every random choice of this module (digits split, subset,
gaussian draw); the training seed is separate.

Missing files raise :class:`DatasetNotFound` with a one-line message naming the expected
path; with ``download=False`` the network is never touched.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import socket
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pfc_sweeps.data.bundles import (
    _NUM_CLASSES,
    DATASET_NAMES,
    NORMALIZATION,
    TORCHVISION_FOLDERS,
    DataBundle,
    DatasetNotFound,
)
from pfc_sweeps.data.validate import check_finite


def default_data_root() -> Path:
    """Data root: ``$PFC_DATA`` if set, else ``<user cache dir>/pfc-sweeps/data``."""
    env = os.environ.get("PFC_DATA")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("pfc-sweeps")) / "data"


def balanced_subset(
    labels: torch.Tensor, n_per_class: int, num_classes: int, seed: int
) -> torch.Tensor:
    """Sorted indices of a seeded subset with exactly ``n_per_class`` samples of each class.

    Raises ValueError naming the first class that has fewer than ``n_per_class`` samples.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class}")
    labels = labels.detach().cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    for c in range(num_classes):
        if counts[c] < n_per_class:
            raise ValueError(
                f"n_per_class={n_per_class} but class {c} has only {int(counts[c])} training samples"
            )
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)  # (n_c,)
        perm = torch.randperm(idx.numel(), generator=gen)[:n_per_class]
        picks.append(idx[perm])
    return torch.cat(picks).sort().values


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    n_per_class: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int = 5,
    dim: int = 20,
    n: int = 100,
    n_test: int = 100,
    sigma: float = 1.0,
    download_timeout: float = 20.0,
) -> DataBundle:
    """Load data set ``name`` as a :class:`DataBundle` of tensors on ``device``.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: data root for the torchvision sets (default :func:`default_data_root`).
        download: let torchvision download missing files (False: never touch the network).
        n_per_class: keep a balanced seeded subset of the train split (None: all).
        seed: seed of the digits split, the subset and the gaussian draw.
        device: where the tensors live.
        num_classes, dim, n, n_test, sigma: ``gaussian`` only (K, d, train and test
            samples per class, noise std); ignored by the other data sets.
        download_timeout: socket timeout (s) while downloading, so that a dead network
            fails fast instead of hanging.

    Raises:
        ValueError: unknown name or bad option (before any work).
        DatasetNotFound: files missing and not downloadable.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    if n_per_class is not None and (isinstance(n_per_class, bool) or int(n_per_class) < 1):
        raise ValueError(f"n_per_class must be a positive integer or None, got {n_per_class!r}")
    if name == "gaussian":
        _check_gaussian_options(num_classes, dim, n, n_test, sigma)
    device = torch.device(device)

    if name == "digits":
        bundle = _load_digits(seed, device)
    elif name == "gaussian":
        bundle = _make_gaussian(num_classes, dim, n, n_test, sigma, seed, device)
    else:
        root_path = Path(root).expanduser() if root is not None else default_data_root()
        bundle = _load_torchvision(name, root_path, download, device, download_timeout)

    if n_per_class is not None:
        keep = balanced_subset(bundle.train_y, int(n_per_class), bundle.num_classes, seed)
        keep = keep.to(bundle.train_y.device)
        bundle.train_x = bundle.train_x[keep]
        bundle.train_y = bundle.train_y[keep]
    check_finite(bundle.train_x, f"{name} train")  # one pass: a NaN is named as data
    check_finite(bundle.test_x, f"{name} test")
    bundle.checked = "when loaded"
    return bundle


# ----------------------------------------------------------------------------- helpers


def _check_gaussian_options(num_classes: int, dim: int, n: int, n_test: int, sigma: float) -> None:
    if int(num_classes) < 2:
        raise ValueError(f"gaussian: num_classes (K) must be >= 2, got {num_classes}")
    if int(dim) < 1:
        raise ValueError(f"gaussian: dim (d) must be >= 1, got {dim}")
    if int(n) < 1 or int(n_test) < 0:
        raise ValueError(f"gaussian: n must be >= 1 and n_test >= 0, got n={n}, n_test={n_test}")
    if not (float(sigma) >= 0.0 and np.isfinite(sigma)):
        raise ValueError(f"gaussian: sigma must be a finite number >= 0, got {sigma}")


def _load_digits(seed: int, device: torch.device) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.data.astype(np.float64) / 16.0  # (1797, 64) in [0, 1]
    y = ds.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed
    )
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std

    def as_t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a, dtype=dtype).to(device)

    return DataBundle(
        train_x=as_t(x[idx_tr].reshape(-1, 1, 8, 8), torch.float32),
        train_y=as_t(y[idx_tr], torch.int64),
        test_x=as_t(x[idx_te].reshape(-1, 1, 8, 8), torch.float32),
        test_y=as_t(y[idx_te], torch.int64),
        num_classes=10,
        in_shape=(1, 8, 8),
        name="digits",
    )


def gaussian_mixture(
    num_classes: int, d: int, sizes: Sequence[int], *, sigma: float = 1.0, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The MUFM data (paper section IV-B): mu_k uniform on S^{d-1}, x ~ N(mu_k, sigma^2 I_d).

    One draw ``(x (K m, d) float64, y (K m,) int64)`` per ``m`` in ``sizes``, K =
    ``num_classes``, samples ordered class by class, all from one CPU generator seeded with
    ``seed`` (same draw on any device).
    """
    k = num_classes
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=gen, dtype=torch.float64)
    mu = mu / mu.norm(dim=1, keepdim=True)  # (K, d)
    out = []
    for m in sizes:
        y = torch.arange(k).repeat_interleave(int(m))  # (K m,)
        x = mu[y] + sigma * torch.randn(k * int(m), d, generator=gen, dtype=torch.float64)
        out.append((x, y))
    return out


def _make_gaussian(
    num_classes: int, d: int, n: int, n_test: int, sigma: float, seed: int, device: torch.device
) -> DataBundle:
    (train_x, train_y), (test_x, test_y) = gaussian_mixture(
        num_classes, d, [n, n_test], sigma=sigma, seed=seed
    )
    return DataBundle(
        train_x.float().to(device),
        train_y.to(device),
        test_x.float().to(device),
        test_y.to(device),
        int(num_classes),
        (int(d),),
        "gaussian",
    )


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _gunzip_mnist_raw(raw: Path) -> None:
    """Let ``<root>/MNIST/raw`` hold only ``*.gz`` idx files: torchvision reads them unpacked."""
    if not raw.is_dir():
        return
    for gz in raw.glob("*-ubyte.gz"):
        target = gz.with_suffix("")
        if not target.exists():
            tmp = target.with_name(target.name + ".tmp")
            try:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
            finally:  # a failed unpack leaves no partial file behind
                tmp.unlink(missing_ok=True)


def _torchvision_split(name: str, root: Path, train: bool, download: bool):
    from torchvision import datasets

    if name == "mnist":
        return datasets.MNIST(root, train=train, download=download)
    if name == "fashion_mnist":
        return datasets.FashionMNIST(root, train=train, download=download)
    if name == "cifar10":
        return datasets.CIFAR10(root, train=train, download=download)
    if name == "cifar100":
        return datasets.CIFAR100(root, train=train, download=download)
    return datasets.STL10(root, split="train" if train else "test", download=download)


_LOAD_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError, tarfile.TarError)


def _load_torchvision(
    name: str, root: Path, download: bool, device: torch.device, timeout: float
) -> DataBundle:
    expected = root / TORCHVISION_FOLDERS[name]
    if name in ("mnist", "fashion_mnist"):
        try:
            _gunzip_mnist_raw(expected)
        except (OSError, EOFError) as e:
            raise DatasetNotFound(
                f"{name}: could not unpack the idx files in {expected} ({type(e).__name__}: "
                f"{_one_line(e)}); replace them with good copies"
            ) from None
    splits = []
    for train in (True, False):
        try:
            with _socket_timeout(timeout):
                splits.append(_torchvision_split(name, root, train, download))
        except _LOAD_ERRORS as e:
            if download:
                msg = (
                    f"{name}: files not found at {expected} and the download failed "
                    f"({type(e).__name__}: {_one_line(e)}); check network access, "
                    f"or copy the files there"
                )
            else:
                msg = (
                    f"{name}: files not found (or incomplete) at {expected}; set "
                    f"dataset.download=true with network access, or copy the files there"
                )
            raise DatasetNotFound(msg) from None
    (train_x, train_y), (test_x, test_y) = (_to_tensors(name, ds, device) for ds in splits)
    return DataBundle(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=_NUM_CLASSES[name],
        in_shape=tuple(train_x.shape[1:]),
        name=name,
    )


def _to_tensors(name: str, ds, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole split -> normalised float32 (N, C, H, W) and int64 (N,), on ``device``."""
    if name in ("mnist", "fashion_mnist"):
        pix = ds.data.unsqueeze(1)  # (N, 1, 28, 28) uint8
        labels = torch.as_tensor(ds.targets)
    elif name in ("cifar10", "cifar100"):
        pix = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # HWC -> CHW
        labels = torch.as_tensor(np.asarray(ds.targets))
    else:  # stl10: already (N, 3, 96, 96)
        pix = torch.from_numpy(np.ascontiguousarray(ds.data))
        labels = torch.as_tensor(np.asarray(ds.labels))
    mean, std = NORMALIZATION[name]
    x = pix.to(device).contiguous().to(torch.float32)  # uint8 travels, float is made there
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    x.div_(255.0).sub_(m).div_(s)
    return x, labels.to(device=device, dtype=torch.int64)
