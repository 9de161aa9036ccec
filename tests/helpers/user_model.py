"""A model the project has never seen, reached only through ``arch.model._target_``."""

from __future__ import annotations

import torch
from torch import nn


class Mixer(nn.Module):
    """x (B, C, H, W) -> conv map -> pooled -> 2 MLP blocks of one width -> head."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(16, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3)]
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.pool(self.conv(x)).flatten(1))
        for blk in self.blocks:
            h = h + blk(h)
        return self.head(h)


class Twice(nn.Module):
    """A small MLP whose forward runs ``shared`` twice (weight sharing) and ``spare`` never.

    ``tied=True`` wraps each use in its own module (the documented way to study it)."""

    def __init__(self, num_classes: int, in_shape: list[int], width: int = 16, tied: bool = False):
        super().__init__()
        d = 1
        for s in in_shape:
            d *= int(s)
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU())
        self.shared = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.spare = nn.Linear(width, width)
        self.tied = tied
        if tied:
            self.use1, self.use2 = nn.Sequential(self.shared), nn.Sequential(self.shared)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.tied:
            return self.head(self.use2(self.use1(h)))
        return self.head(self.shared(self.shared(h)))
