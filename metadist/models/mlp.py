"""The sinusoid regression network of the MAML paper: 1-40-40-1 with ReLU by default."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """ReLU MLP split into `body` (hidden layers) and `head` (the output layer)."""

    def __init__(self, in_features: int = 1, hidden: list[int] | None = None, out_features: int = 1):
        super().__init__()
        hidden = [40, 40] if hidden is None else hidden
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor, step: int = 0, bn: str = "batch", part: str = "all",
                stats: bool = False):
        # `step`, `bn` and `stats` exist so every model shares one call signature; an MLP has no BatchNorm.
        if part == "body":
            return self.body(x)
        if part == "head":
            return self.head(x)
        out = self.head(self.body(x))
        return (out, []) if stats else out
