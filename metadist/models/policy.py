"""The MAML paper's reinforcement-learning policy: a ReLU MLP (2 x 100 by default) giving the mean of a
Gaussian over actions, with a learned state-independent log standard deviation (initial std 1.0)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PolicyHead(nn.Module):
    """The mean's output layer and the log standard deviation: what ANIL adapts."""

    def __init__(self, width: int, act_dim: int, init_std: float):
        super().__init__()
        self.linear = nn.Linear(width, act_dim)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean = self.linear(h)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)


class GaussianPolicy(nn.Module):
    """obs -> (mean, log std) of a diagonal Gaussian, concatenated on the last dimension, so that one
    `torch.func.functional_call` gives both (`algorithms.policy_gradient.gaussian_log_prob` splits them)."""

    def __init__(self, obs_dim: int = 2, hidden: list[int] | None = None, act_dim: int = 2, init_std: float = 1.0):
        super().__init__()
        hidden = [100, 100] if hidden is None else hidden
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = PolicyHead(width, act_dim, init_std)

    def forward(self, x: torch.Tensor, step: int = 0, bn: str = "batch", part: str = "all",
                stats: bool = False):
        # `step`, `bn` and `stats` exist so every model shares one call signature; a policy has no BatchNorm.
        if part == "body":
            return self.body(x)
        if part == "head":
            return self.head(x)
        out = self.head(self.body(x))
        return (out, []) if stats else out
