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
