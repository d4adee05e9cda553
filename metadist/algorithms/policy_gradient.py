"""The policy-gradient pieces of MAML for reinforcement learning, as pure torch on batched trajectories.

Trajectories come as (T tasks, N trajectories, H steps) tensors with a mask that is 1 for the steps a
trajectory took and 0 after it ended. Every function here works per task: a task's baseline is fitted
to its own trajectories only, and its advantages are normalised over its own steps.

The protocol (MAML paper, appendix A.2, after the reference code's rllab components): a linear feature
baseline fitted per task by ridge regression on the discounted returns, with features (obs, obs^2,
t/100, (t/100)^2, (t/100)^3, 1); generalised advantage estimation with gamma = 0.99 and lambda = 1;
advantages normalised to zero mean and unit variance.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call

from metadist.algorithms.adaptation import Tensors, inner_grad, model_params, step_lr
from metadist.algorithms.spec import InnerSpec


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(T, N, H) the discounted return from each step to the trajectory's end (0 after it)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for k in reversed(range(rewards.shape[-1])):
        running = (rewards[..., k] + gamma * running) * mask[..., k]
        out[..., k] = running
    return out


def baseline_features(obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T, N, H, F) rllab's linear feature baseline features: the observation clipped to [-10, 10], its
    square, t/100 and its square and cube, and a constant; zero after a trajectory's end."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[2], dtype=obs.dtype).view(1, 1, -1, 1).expand(*obs.shape[:3], 1) / 100.0
    f = torch.cat([o, o * o, t, t * t, t ** 3, torch.ones_like(t)], dim=-1)
    return f * mask[..., None]


def fit_baseline(obs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                 reg: float = 1e-5) -> torch.Tensor:
    """(T, N, H) each task's linear baseline, fitted by ridge regression to that task's discounted
    returns over the steps its trajectories took. As rllab does, the ridge coefficient grows tenfold
    (up to 5 times) while the solution is not finite."""
    f = baseline_features(obs, mask).flatten(1, 2).double()  # (T, N*H, F): masked rows are zero
    y = (returns * mask).flatten(1, 2).double()
    gram = f.transpose(1, 2) @ f
    rhs = f.transpose(1, 2) @ y[..., None]
    eye = torch.eye(f.shape[-1], dtype=f.dtype)
    for attempt in range(5):
        w = torch.linalg.solve(gram + reg * 10 ** attempt * eye, rhs)
        if torch.isfinite(w).all():
            break
    values = (f @ w).squeeze(-1).view_as(returns)
    return values.to(returns.dtype) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """(T, N, H) generalised advantage estimates; a trajectory's value after its end is 0. With
    lam = 1 they are the discounted returns minus the baseline."""
    next_values = torch.cat([values[..., 1:] * mask[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (rewards + gamma * next_values - values) * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for k in reversed(range(rewards.shape[-1])):
        running = (deltas[..., k] + gamma * lam * running) * mask[..., k]
        out[..., k] = running
    return out


def normalize(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(T, N, H) each task's advantages shifted and scaled to mean 0 and variance 1 over its steps."""
    count = mask.sum((1, 2), keepdim=True).clamp_min(1)
    mean = (advantages * mask).sum((1, 2), keepdim=True) / count
    var = (((advantages - mean) * mask) ** 2).sum((1, 2), keepdim=True) / count
    return (advantages - mean) / (var.sqrt() + eps) * mask


def advantages(obs: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 0.99,
               lam: float = 1.0, normalise: bool = True) -> torch.Tensor:
    """The inner loop's advantages: baseline fitted per task, then GAE, then (by default) normalised."""
    values = fit_baseline(obs, discounted_returns(rewards, mask, gamma), mask)
    adv = gae(rewards, values, mask, gamma, lam)
    return normalize(adv, mask) if normalise else adv


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T,) each task's REINFORCE surrogate, minus the mean over its steps of log-likelihood times
    advantage: its gradient is the policy gradient, and it stays differentiable for the outer loop."""
    return -(log_probs * advantages.detach() * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)


def gaussian_log_prob(out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of `actions` under the diagonal Gaussian whose mean and log std a policy gives
    concatenated in `out` (`models.policy.GaussianPolicy`), summed over the action's coordinates."""
    mean, log_std = out.chunk(2, dim=-1)
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def adapt_policy(model, params: Tensors, obs: torch.Tensor, actions: torch.Tensor, adv: torch.Tensor,
                 mask: torch.Tensor, spec: InnerSpec, k: int = 0) -> Tensors:
    """One task's inner step `k` on its trajectories (N, H, ...): the policy's parameters minus the
    step's rate (`adaptation.step_lr`: spec.lr, a learned Meta-SGD or LSLR rate, spec.later_lr after the
    first step) times the gradient of its REINFORCE surrogate; only the head with spec.adapt `head`
    (ANIL). Differentiable in `params` (second order) unless spec.first_order. Returns the policy's own
    parameters (without learned rates)."""
    fast = model_params(params)
    names = [n for n in fast if n.startswith("head.")] if spec.adapt == "head" else list(fast)

    def loss(ad: Tensors):
        lp = gaussian_log_prob(functional_call(model, {**fast, **ad}, (obs,)), actions)
        return reinforce_loss(lp[None], adv[None], mask[None])[0], {}

    g, _ = inner_grad(loss, {n: fast[n] for n in names}, create_graph=not spec.first_order)
    if spec.first_order:
        g = {n: v.detach() for n, v in g.items()}
    return {**fast, **{n: fast[n] - step_lr(params, n, k, spec) * g[n] for n in names}}
