"""Data sets (pfc_sweeps/data/): real on-disk formats through torchvision, digits, gaussian."""

from __future__ import annotations

import gzip
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import fakedata
import numpy as np
import pytest
import torch
import torchvision

from pfc_sweeps.data.builtin import balanced_subset, default_data_root, load_dataset
from pfc_sweeps.data.bundles import DATASET_NAMES, DatasetNotFound

# The usual normalisation constants, written out independently of data.NORMALIZATION.
MEAN_STD = {
    "mnist": ([0.1307], [0.3081]),
    "fashion_mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "stl10": ([0.4467, 0.4398, 0.4066], [0.2603, 0.2566, 0.2713]),
}
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


def _normalized(pixels_chw: np.ndarray, name: str) -> np.ndarray:
    """(N, C, H, W) uint8 -> float64 (x / 255 - mean_c) / std_c."""
    mean, std = (np.array(v, dtype=np.float64).reshape(1, -1, 1, 1) for v in MEAN_STD[name])
    return (pixels_chw.astype(np.float64) / 255.0 - mean) / std


def _close(t: torch.Tensor, a: np.ndarray) -> bool:
    return t.dtype == torch.float32 and np.allclose(t.double().numpy(), a, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- MNIST format


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """The idx ubyte format: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(root: Path, folder: str, n_train: int, n_test: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lab = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(lab)
        _write_idx(raw / f"{split}-images-idx3-ubyte", img, gz)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", lab, gz)
        out[split] = (img, lab)
    return out


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_format_through_torchvision(tmp_path, monkeypatch, name, folder, gz) -> None:
    written = _write_mnist(tmp_path, folder, n_train=30, n_test=20, gz=gz)
    cls = getattr(torchvision.datasets, folder)
    calls = []
    real_init = cls.__init__

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("train"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__init__", spy)
    b = load_dataset(name, root=tmp_path, download=False)
    assert sorted(calls) == [False, True]  # the real torchvision class read both splits
    img, lab = written["train"]
    assert b.train_x.shape == (30, 1, 28, 28) and b.in_shape == (1, 28, 28)
    assert _close(b.train_x, _normalized(img[:, None], name))
    assert b.train_y.dtype == torch.int64 and b.train_y.tolist() == lab.tolist()
    img, lab = written["t10k"]
    assert _close(b.test_x, _normalized(img[:, None], name))
    assert b.test_y.tolist() == lab.tolist()
    assert (b.num_classes, b.name) == (10, name)


# ----------------------------------------------------------------------------- CIFAR format


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_format_through_torchvision(tmp_path, no_md5, name) -> None:
    written = fakedata.write(name, tmp_path, n_per_class=2 if name == "cifar10" else 1)
    b = load_dataset(name, root=tmp_path, download=False)
    img, lab = written["train"]
    assert b.train_x.shape == (len(lab), 3, 32, 32) and b.in_shape == (3, 32, 32)
    assert _close(b.train_x, _normalized(img, name))
    assert b.train_y.tolist() == lab
    img, lab = written["test"]
    assert _close(b.test_x, _normalized(img, name))
    assert b.test_y.tolist() == lab
    assert b.num_classes == (100 if name == "cifar100" else 10)


def test_stl10_format_through_torchvision(tmp_path, no_md5) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    written = {}
    for split, n in (("train", 3), ("test", 2)):
        img = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # CHW
        lab = rng.integers(0, 10, size=n)
        # STL10 binaries store each channel column-major and labels 1-based
        (folder / f"{split}_X.bin").write_bytes(img.transpose(0, 1, 3, 2).tobytes())
        (folder / f"{split}_y.bin").write_bytes((lab + 1).astype(np.uint8).tobytes())
        written[split] = (img, lab)
    (folder / "unlabeled_X.bin").write_bytes(b"")
    b = load_dataset("stl10", root=tmp_path, download=False)
    for x, y, (img, lab) in (
        (b.train_x, b.train_y, written["train"]),
        (b.test_x, b.test_y, written["test"]),
    ):
        assert _close(x, _normalized(img, "stl10"))
        assert y.tolist() == lab.tolist()


# ----------------------------------------------------------------------------- missing files


def _forbid_network(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setattr("socket.create_connection", boom)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "stl10", "cifar100"])
def test_missing_files_offline_one_line(tmp_path, monkeypatch, name) -> None:
    _forbid_network(monkeypatch)
    folder = {
        "mnist": "MNIST/raw",
        "fashion_mnist": "FashionMNIST/raw",
        "cifar10": "cifar-10-batches-py",
        "stl10": "stl10_binary",
        "cifar100": "cifar-100-python",
    }[name]
    root = tmp_path / "no" / "such" / "dir"
    with pytest.raises(DatasetNotFound) as err:
        load_dataset(name, root=root, download=False)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in msg
    assert str(root / folder) in msg
    assert "dataset.download=true" in msg and "copy the files there" in msg


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_failed_download_is_one_line(tmp_path, monkeypatch, name) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFound) as err:
        load_dataset(name, root=tmp_path, download=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "download failed" in msg and str(tmp_path) in msg
    # the cause (torchvision 0.18, the lowest supported, prints it and raises "Error downloading")
    assert "Name or service not known" in msg or "Error downloading" in msg


def test_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError, match="unknown data set 'imagenet'") as err:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(err.value)


def test_default_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PFC_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d"
    monkeypatch.delenv("PFC_DATA")
    assert default_data_root().parts[-2:] == ("pfc-sweeps", "data")


# ----------------------------------------------------------------------------- digits


def test_digits_split_and_normalisation() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    b = load_dataset("digits", seed=0)
    assert b.in_shape == (1, 8, 8) and b.num_classes == 10
    assert b.train_x.shape == (1437, 1, 8, 8) and b.test_x.shape == (360, 1, 8, 8)
    # stratified: every class is split 80/20 up to rounding
    full = np.bincount(raw.target, minlength=10)
    tr = np.bincount(b.train_y.numpy(), minlength=10)
    assert np.all(np.abs(tr - 0.8 * full) <= 1) and tr.sum() == 1437
    # train statistics standardise the train split exactly
    xt = b.train_x.double()
    assert abs(xt.mean().item()) < 1e-6 and abs(xt.std(unbiased=False).item() - 1) < 1e-6
    # undoing the affine map gives back the 0..16 pixel counts, and train + test = all samples
    tr_rows = (b.train_x.double().numpy().reshape(-1, 64), b.train_y.numpy())
    te_rows = (b.test_x.double().numpy().reshape(-1, 64), b.test_y.numpy())
    # pixel 0 and pixel 16 both occur, so min/max give the affine map back
    both = np.concatenate([tr_rows[0], te_rows[0]])
    lo, hi = both.min(), both.max()
    counts = np.rint((both - lo) / (hi - lo) * 16)
    assert np.allclose((both - lo) / (hi - lo) * 16, counts, atol=1e-4)
    got = sorted(map(tuple, np.column_stack([counts, np.concatenate([tr_rows[1], te_rows[1]])])))
    want = sorted(map(tuple, np.column_stack([raw.data, raw.target])))
    assert got == want
    # the standardisation uses the train split's mean and std of the [0, 1] pixels
    train01 = (tr_rows[0] - lo) / (hi - lo)
    mean, std = train01.mean(), train01.std()
    assert np.allclose(tr_rows[0], (train01 - mean) / std, atol=1e-5)


def test_digits_seeding() -> None:
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


# ----------------------------------------------------------------------------- subsets


def test_n_per_class_balanced_seeded_subset() -> None:
    full = load_dataset("digits", seed=0)
    sub = load_dataset("digits", seed=0, n_per_class=20)
    again = load_dataset("digits", seed=0, n_per_class=20)
    other = load_dataset("gaussian", seed=0, n=50)
    assert sub.train_x.shape == (200, 1, 8, 8)
    assert torch.bincount(sub.train_y, minlength=10).tolist() == [20] * 10
    assert torch.equal(sub.train_x, again.train_x)
    assert torch.equal(sub.test_x, full.test_x)  # the test split is kept whole
    # every kept sample is a train sample with its own label
    eq = (sub.train_x.flatten(1)[:, None, :] == full.train_x.flatten(1)[None]).all(
        -1
    )  # (200, 1437)
    assert eq.any(1).all()
    nearest = eq.float().argmax(1)
    assert torch.equal(full.train_y[nearest], sub.train_y)
    assert nearest.unique().numel() == 200
    assert other.train_x.shape == (250, 20)
    # a different subset seed picks different samples
    idx0 = balanced_subset(full.train_y, 20, 10, seed=0)
    idx1 = balanced_subset(full.train_y, 20, 10, seed=1)
    assert not torch.equal(idx0, idx1)
    assert torch.bincount(full.train_y[idx1], minlength=10).tolist() == [20] * 10


def test_n_per_class_too_large_names_class() -> None:
    counts = np.bincount(load_dataset("digits").train_y.numpy())
    n = int(counts.max())
    c = int(np.nonzero(counts < n)[0][0])  # the first class that is too small
    with pytest.raises(ValueError, match=rf"n_per_class={n} but class {c} has only {counts[c]} "):
        load_dataset("digits", n_per_class=n)
    with pytest.raises(ValueError, match="n_per_class must be a positive integer"):
        load_dataset("digits", n_per_class=0)


# ----------------------------------------------------------------------------- gaussian


def test_gaussian_mixture() -> None:
    b = load_dataset("gaussian", num_classes=4, dim=7, n=300, n_test=10, sigma=0.01, seed=3)
    assert b.in_shape == (7,) and b.num_classes == 4
    assert b.train_x.shape == (1200, 7) and b.test_x.shape == (40, 7)
    assert b.train_y.tolist() == [k for k in range(4) for _ in range(300)]  # Y = I_K (x) 1_n^T
    means = torch.stack([b.train_x[b.train_y == k].double().mean(0) for k in range(4)])
    assert torch.allclose(means.norm(dim=1), torch.ones(4, dtype=torch.float64), atol=2e-3)
    test_means = torch.stack([b.test_x[b.test_y == k].double().mean(0) for k in range(4)])
    assert torch.allclose(means, test_means, atol=1e-2)  # same mu_k for both splits
    within = (b.train_x.double() - means[b.train_y]).pow(2).sum(1).mean()
    assert abs(within.item() / (7 * 0.01**2) - 1) < 0.1  # E||x - mu||^2 = d sigma^2
    same, other = load_dataset("gaussian", seed=3), load_dataset("gaussian", seed=4)
    assert torch.equal(same.train_x, load_dataset("gaussian", seed=3).train_x)
    assert not torch.equal(same.train_x, other.train_x)


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 1}, {"dim": 0}, {"n": 0}, {"sigma": -1.0}, {"sigma": float("nan")}]
)
def test_gaussian_bad_options(kwargs) -> None:
    with pytest.raises(ValueError, match="gaussian"):
        load_dataset("gaussian", **kwargs)


# ----------------------------------------------------------------------------- real MNIST


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"{SHARED_MNIST} not present")
def test_real_mnist_t10k(tmp_path) -> None:
    """The real t10k split, copied under the train names too, through torchvision.MNIST."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        src = SHARED_MNIST / f"t10k-{kind}-ubyte.gz"
        for split in ("train", "t10k"):
            shutil.copy(src, raw / f"{split}-{kind}-ubyte.gz")
    b = load_dataset("mnist", root=tmp_path, download=False, n_per_class=100, seed=0)
    assert b.train_x.shape == (1000, 1, 28, 28)
    assert torch.bincount(b.train_y, minlength=10).tolist() == [100] * 10
    assert torch.bincount(b.test_y, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]  # fmt: skip
    with gzip.open(SHARED_MNIST / "t10k-images-idx3-ubyte.gz", "rb") as f:
        pix = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    assert _close(b.test_x, _normalized(pix, "mnist"))


def test_module_dataset_class_count_subset_and_streaming(tmp_path) -> None:
    from pfc_sweeps.data.bundles import DataBundle, StreamBundle
    from pfc_sweeps.data.module import load_module_dataset

    fakedata.write_image_folder(tmp_path, k=3, n_per_class=6, size=4)
    node = {
        "_target_": "torchvision.datasets.ImageFolder",
        "transform": {"_target_": "torchvision.transforms.ToTensor"},
    }
    train, test = (
        {**node, "root": str(tmp_path / "train")},
        {**node, "root": str(tmp_path / "test")},
    )
    mem = load_module_dataset(train, test, n_per_class=4, seed=1)
    assert isinstance(mem, DataBundle) and mem.num_classes == 3 and mem.in_shape == (3, 4, 4)
    assert torch.bincount(mem.train_y).tolist() == [4, 4, 4] and mem.size("test") == 3
    stream = load_module_dataset(train, test, n_per_class=4, seed=1, data_gb=0)
    assert isinstance(stream, StreamBundle) and stream.size("train") == 12
    order = torch.tensor([5, 0, 11, 3])
    for (xa, ya), (xb, yb) in zip(
        mem.batches("train", order, 3), stream.batches("train", order, 3), strict=True
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the pixels are ToTensor's of the PNG files, in ImageFolder's order
    from PIL import Image

    first = sorted((tmp_path / "train" / "class0").iterdir())[0]
    pix = torch.from_numpy(np.array(Image.open(first))).permute(2, 0, 1).float() / 255
    full = load_module_dataset(train, test)
    assert torch.allclose(full.train_x[0], pix) and full.train_y[0] == 0
