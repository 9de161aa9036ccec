"""A user's own data set, reached only through ``dataset.train._target_`` (tests of issue 19).

:class:`Digits` serves scikit-learn's 8x8 digits as ``(1x8x8 float tensor, int label)``
items, optionally with one defect of a real data set at item ``at``.
"""

from __future__ import annotations

import numpy as np
import torch

#: defect -> what it does to the split
DEFECTS = (
    "nan_pixel",  # item `at` has a NaN pixel
    "inf_pixel",  # item `at` has an inf pixel
    "negative",  # label of item `at` is -1
    "float",  # label of item `at` is 2.5
    "text",  # label of item `at` is "seven"
    "big",  # classes has 10 names, label of item `at` is 10
    "shape",  # item `at` is 1x9x9
    "empty",  # no items
    "single",  # every label is 3
    "raises",  # item `at` raises OSError when read
    "no9",  # no item of class 9
)


class Digits(torch.utils.data.Dataset):
    """``n`` digits of the train (first) or test (last) part, with an optional ``defect``.

    ``targets=True`` exposes the labels as a ``targets`` list (read without loading items),
    as torchvision sets do; ``classes=True`` names the 10 classes.
    """

    def __init__(
        self,
        train: bool = True,
        n: int = 300,
        defect: str | None = None,
        at: int = 7,
        targets: bool = False,
        classes: bool = False,
    ) -> None:
        from sklearn.datasets import load_digits

        if defect is not None and defect not in DEFECTS:
            raise ValueError(f"unknown defect {defect!r}")
        d = load_digits()
        x, y = d.data / 16.0, d.target.astype(np.int64)
        x, y = (x[:n], y[:n]) if train else (x[-n:], y[-n:])
        if defect == "no9":
            x, y = x[y != 9], y[y != 9]
        if defect == "single":
            y = np.full_like(y, 3)
        self.x = [torch.tensor(r, dtype=torch.float32).view(1, 8, 8) for r in x]
        self.y: list = [int(v) for v in y]
        self.defect, self.at = defect, at
        if defect == "empty":
            self.x, self.y = [], []
        elif defect in ("nan_pixel", "inf_pixel"):
            self.x[at][0, 2, 3] = float(defect[:3])
        elif defect == "shape":
            self.x[at] = torch.zeros(1, 9, 9)
        elif defect in ("negative", "float", "text", "big"):
            self.y[at] = {"negative": -1, "float": 2.5, "text": "seven", "big": 10}[defect]
        if targets:
            self.targets = list(self.y)
        if classes:
            self.classes = [f"digit{c}" for c in range(10)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.defect == "raises" and i == self.at:
            raise OSError(f"cannot read digit {i}: unexpected end of file")
        return self.x[i], self.y[i]
