"""The MAML paper's reinforcement-learning policy: a ReLU MLP (2 x 100 by default) giving the mean of a
Gaussian over actions, with a learned state-independent log standard deviation (initial std 1.0)."""

from __future__ import annotations

import math

import torch
from torch import nn

from metadist.models.mlp import MLP


class PolicyHead(nn.Module):
    """The mean's output layer and the log standard deviation: what ANIL adapts."""

    def __init__(self, linear: nn.Linear, init_std: float):
        super().__init__()
        self.linear = linear
        self.log_std = nn.Parameter(torch.full((linear.out_features,), math.log(init_std)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean = self.linear(h)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)


class GaussianPolicy(MLP):
    """obs -> (mean, log std) of a diagonal Gaussian, concatenated on the last dimension, so that one
    `torch.func.functional_call` gives both (`algorithms.policy_gradient.gaussian_log_prob` splits them).
    The sinusoid MLP's body, forward and parameter names; its head also holds the log std."""

    def __init__(self, obs_dim: int = 2, hidden: list[int] | None = None, act_dim: int = 2, init_std: float = 1.0):
        super().__init__(obs_dim, [100, 100] if hidden is None else hidden, act_dim)
        self.head = PolicyHead(self.head, init_std)
