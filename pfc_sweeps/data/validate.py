"""Checks of a user's data set (``dataset=module``): every defect is one line, before training.

:class:`CheckedItems` wraps a map-style data set and checks each item as it is read: it
loads (an unreadable or truncated image names its file), it is an ``(image tensor, int
label)`` pair, the label is an integer in ``[0, num_classes)``, the image has the shape of
the first training item and finite values. The in-memory path reads every item once before
training, so a defect stops the job before any training; the streamed path checks the
items as the first epoch reads them and stops at the first bad one, before any results are
written. The whole-split checks (:func:`check_train_labels`, :func:`check_test_labels`,
:func:`check_nonempty`) run on the label tensors before any training, and
:func:`check_finite` checks the built-in data sets' tensors in one pass.

Every defect raises :class:`DataError`, whose text is one line naming the split
(``dataset.train`` or ``dataset.test``), the item index in the user's data set (and, for an
``ImageFolder``, the file) and what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pfc_sweeps.errors import PFCError

__all__ = [
    "CheckedItems",
    "DataError",
    "as_label",
    "check_class_names",
    "check_finite",
    "check_nonempty",
    "check_test_labels",
    "check_train_labels",
    "labels_of",
]


class DataError(PFCError):
    """A defect of the data; ``str(err)`` is one line naming the split, the item and what is wrong."""

    def __init__(self, msg: str = "") -> None:
        # raised in a DataLoader worker, it is rebuilt in the main process from the worker's
        # whole traceback (torch's ExceptionWrapper): keep its last line, this class's message
        if msg.startswith(f"Caught {type(self).__name__}"):
            last = msg.rstrip().splitlines()[-1]
            msg = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(msg)


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_label(y: Any) -> int | None:
    """``y`` as an int when it is an integer: a Python or NumPy number with an integral value
    (3 or 3.0), or a 0-d tensor or array of one; not a bool or a string. Else None."""
    if isinstance(y, bool | np.bool_):
        return None
    if isinstance(y, Tensor | np.ndarray | np.generic):
        if y.ndim != 0 or y.dtype in (torch.bool, np.bool_) or _is_complex(y):
            return None
        y = y.item()
    if isinstance(y, int):
        return y
    if isinstance(y, float) and y.is_integer():
        return int(y)
    return None


def _is_complex(y: Tensor | np.ndarray | np.generic) -> bool:
    return y.dtype.is_complex if isinstance(y, Tensor) else y.dtype.kind == "c"


def _show(y: Any) -> str:
    if isinstance(y, np.generic):
        return f"{y.item()!r} ({y.dtype})"
    if isinstance(y, Tensor | np.ndarray):
        return f"{y.tolist()!r} ({type(y).__name__} of dtype {y.dtype}, shape {tuple(y.shape)})"
    return f"{y!r} ({type(y).__name__})"


def _file_of(ds: Any, i: int) -> str:
    """The file of item ``i`` of an ``ImageFolder``/``DatasetFolder`` (``samples``), else ''."""
    samples = getattr(ds, "samples", None) or getattr(ds, "imgs", None)
    try:
        path = samples[i][0] if samples is not None else None
    except (IndexError, KeyError, TypeError):
        return ""
    return str(path) if isinstance(path, str | bytes) or hasattr(path, "__fspath__") else ""


def _wrong_label(label: int, num_classes: int, split: str, classes_from: str) -> str:
    if label < 0:
        return f"label {label} is negative; labels are 0 .. num_classes-1"
    if split == "dataset.train":
        return f"label {label} >= num_classes={num_classes} ({classes_from})"
    return f"label {label} is not a class of dataset.train (num_classes={num_classes})"


class CheckedItems(torch.utils.data.Dataset):
    """``ds`` (a map-style data set) whose items are checked as they are read.

    ``split`` names it in the errors; ``num_classes``, ``shape`` (with ``shape_of``, the item
    it came from) and ``stage`` (how far the job got) are set by the loader as it learns them.
    Items come back as ``(x tensor, int label)``.
    """

    def __init__(self, ds: torch.utils.data.Dataset, split: str) -> None:
        self.ds, self.split = ds, split
        self.num_classes: int | None = None
        self.classes_from = ""
        self.shape: tuple[int, ...] | None = None
        self.shape_of = ""
        self.stage = "before any training"

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def where(self, i: int) -> str:
        """``dataset.train item 7 (path/to/file.png)``."""
        path = _file_of(self.ds, i)
        return f"{self.split} item {i}" + (f" ({path})" if path else "")

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            item = self.ds[i]
        except Exception as e:  # a user's data set may raise anything for a bad file
            raise DataError(
                f"{self.where(i)} could not be loaded ({type(e).__name__}: {_one_line(e)}); "
                f"the job stopped {self.stage}"
            ) from None
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise DataError(
                f"{self.where(i)} is a {type(item).__name__}, not an (image tensor, label) pair"
            )
        x, y = item
        return self._check_x(i, x), self._check_y(i, y)

    def _check_y(self, i: int, y: Any) -> int:
        label = as_label(y)
        if label is None:
            raise DataError(f"{self.where(i)}: label {_show(y)} is not an integer")
        k = self.num_classes
        if label < 0 or (k is not None and label >= k):
            msg = _wrong_label(label, k or 0, self.split, self.classes_from)
            raise DataError(f"{self.where(i)}: {msg}")
        return label

    def _check_x(self, i: int, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise DataError(
                f"{self.where(i)} is ({type(x).__name__}, label), not (tensor, label); add a "
                "transform that gives a tensor, e.g. torchvision.transforms.ToTensor"
            )
        if self.shape is not None and tuple(x.shape) != self.shape:
            raise DataError(
                f"{self.where(i)} has shape {tuple(x.shape)} but {self.shape_of} has "
                f"{self.shape}; all samples must have one shape (e.g. add a Resize transform)"
            )
        if not bool(torch.isfinite(x).all()):
            raise DataError(
                f"{self.where(i)} holds non-finite values (NaN or inf): a data problem, not a "
                f"training one; fix or drop the item (the job stopped {self.stage})"
            )
        return x


def check_nonempty(ds: Any, split: str) -> None:
    """Refuse an empty split.

    Args:
        ds: the split's data set (anything with ``len``).
        split: its name in the error (``dataset.train``).

    Raises:
        DataError: ``ds`` has no items.
    """
    if len(ds) == 0:
        raise DataError(f"{split} is empty (0 items); check the path or arguments it was given")


def labels_of(values: Any, split: str, where: Callable[[int], str]) -> Tensor:
    """The labels of a ``targets``/``labels`` attribute, each checked to be an integer >= 0.

    Args:
        values: the attribute (list, array or tensor), one label per item.
        split: the split's name in the error.
        where: ``where(i)`` names item ``i`` (and its file) in the error.

    Returns:
        (N,) int64 labels.

    Raises:
        DataError: a label is not an integer (:func:`as_label`), or is negative.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{split}: its labels have shape {arr.shape}, not one label per item")
    if arr.dtype.kind == "f":  # (N,) integral values only
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))[:1]
    elif arr.dtype.kind not in "iu":
        bad = [i for i, v in enumerate(arr) if as_label(v) is None][:1]
    else:
        bad = []
    for i in bad:
        raise DataError(f"{where(int(i))}: label {_show(arr[i])} is not an integer")
    y = torch.as_tensor(arr.astype(np.int64))  # (N,)
    neg = torch.nonzero(y < 0)
    if len(neg):
        i = int(neg[0])
        raise DataError(f"{where(i)}: {_wrong_label(int(y[i]), 0, split, '')}")
    return y


def check_train_labels(
    y: Tensor, num_classes: int, classes_from: str, where: Callable[[int], str]
) -> None:
    """Check the training labels: at least 2 classes, all in ``[0, num_classes)``, each
    class present (NC1-NC4 need every class mean; docs/metrics.md).

    Args:
        y: (N,) int64 training labels.
        num_classes: K of the job.
        classes_from: where K comes from, for the error (``len(dataset.train.classes)``).
        where: ``where(i)`` names item ``i`` in the error.

    Raises:
        DataError: a single class, a label >= K, or a class without items.
    """
    present = torch.unique(y)
    if len(present) < 2:
        raise DataError(
            f"dataset.train has a single class ({int(present[0])}); the collapse metrics "
            "need at least 2 classes"
        )
    big = torch.nonzero(y >= num_classes)
    if len(big):
        i = int(big[0])
        raise DataError(
            f"{where(i)}: {_wrong_label(int(y[i]), num_classes, 'dataset.train', classes_from)}"
        )
    missing = sorted(set(range(num_classes)) - set(present.tolist()))
    if missing:
        raise DataError(
            f"dataset.train has no item of class(es) {_few(missing)} (num_classes={num_classes}, "
            f"{classes_from}); every class needs training samples"
        )


def check_test_labels(y: Tensor, num_classes: int, where: Callable[[int], str]) -> None:
    """Check the test labels against the training classes (0 .. K-1, all present).

    Args:
        y: (M,) int64 test labels.
        num_classes: K of the job.
        where: ``where(i)`` names item ``i`` in the error.

    Raises:
        DataError: a test class the training split lacks (they are listed), or a single class.
    """
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        extra = sorted(set(y[bad].tolist()))
        raise DataError(
            f"dataset.test has items of class(es) {_few(extra)} that dataset.train lacks "
            f"(num_classes={num_classes}; first: {where(first)})"
        )
    present = torch.unique(y)
    if len(present) < 2:
        raise DataError(
            f"dataset.test has a single class ({int(present[0])}); give it items of "
            "at least 2 classes"
        )


def check_class_names(train_classes: Sequence | None, test_classes: Sequence | None) -> None:
    """Check that both splits give the same names the same labels.

    ``ImageFolder`` numbers each split's class folders on its own, so a test folder with
    another set of class folders would shift its labels silently.

    Args:
        train_classes: ``dataset.train.classes`` (None: not named).
        test_classes: ``dataset.test.classes`` (None: not named).

    Raises:
        DataError: both are named and differ (the test classes the training split lacks
            are listed).
    """
    if not train_classes or not test_classes or list(train_classes) == list(test_classes):
        return
    extra = [c for c in test_classes if c not in set(train_classes)]
    if extra:
        raise DataError(f"dataset.test has classes {_few(extra)} that dataset.train lacks")
    raise DataError(
        f"dataset.test has classes {_few(list(test_classes))} but dataset.train has "
        f"{_few(list(train_classes))}: the same names must give the same labels (ImageFolder "
        "numbers each split's class folders on its own); give both splits the same classes"
    )


def _few(values: Sequence, n: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f" (+{len(values) - n} more)" if len(values) > n else "")


def check_finite(x: Tensor, split: str) -> None:
    """Check a split's features in one vectorised pass (the built-in data sets).

    Args:
        x: (N, *in_shape) features.
        split: the split's name in the error.

    Raises:
        DataError: naming the first item with a NaN or inf.
    """
    if x.device.type == "meta":
        return  # shape-only tensors hold no values to check
    ok = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)  # (N,)
    if not bool(ok.all()):
        i = int(torch.nonzero(~ok)[0])
        raise DataError(
            f"{split} item {i} holds non-finite values (NaN or inf): a data problem, not a "
            "training one; the job stopped before any training"
        )
