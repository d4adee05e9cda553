"""MAML for reinforcement learning on batched environments: sample, adapt with one differentiable
policy-gradient step per task, sample again with the adapted policy, and return the post-update
surrogate whose gradient is the meta-gradient (MAML paper, section 5.3).

The environment is any object with `rollout(act, goals, noise) -> Rollouts` (`tasks.navigation`); it is
handed in, so this module stays pure torch. Sampling never builds a graph: the policy gradient needs
only the actions' log-likelihood, which is recomputed from the stored observations and actions.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from metadist.algorithms import policy_gradient as pg

Tensors = dict[str, torch.Tensor]


def policy_act(model, params: Tensors, per_task: bool = False):
    """The sampling function `act(obs, noise)` of a Gaussian policy: mean + std * noise. With
    `per_task`, every parameter has a leading task dimension (adapted policies), matched to obs's."""
    params = {n: p.detach() for n, p in params.items()}

    def one(p: Tensors, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean, log_std = functional_call(model, p, (obs,)).chunk(2, dim=-1)
        return mean + log_std.exp() * z

    if per_task:
        return lambda obs, z: vmap(one)(params, obs, z)
    return lambda obs, z: one(params, obs, z)


def meta_objective(model, params: Tensors, env, goals: torch.Tensor, noise_pre: torch.Tensor,
                   noise_post: torch.Tensor, lr: float, gamma: float = 0.99, lam: float = 1.0,
                   first_order: bool = False):
    """(sum over tasks of the adapted policies' REINFORCE surrogate on their post-update trajectories,
    metrics): the first's gradient in `params` is the MAML-RL meta-gradient (second order unless
    `first_order`). Metrics: the summed mean undiscounted return per task before and after the step."""
    pre = env.rollout(policy_act(model, params), goals, noise_pre)
    adv_pre = pg.advantages(pre.obs, pre.rewards, pre.mask, gamma, lam)
    fast = [pg.adapt_policy(model, params, pre.obs[i], pre.actions[i], adv_pre[i], pre.mask[i], lr,
                            first_order=first_order) for i in range(len(goals))]
    stacked = {n: torch.stack([f[n] for f in fast]) for n in params}
    post = env.rollout(policy_act(model, stacked, per_task=True), goals, noise_post)
    adv_post = pg.advantages(post.obs, post.rewards, post.mask, gamma, lam)
    loss = 0.0
    for i, f in enumerate(fast):
        lp = pg.gaussian_log_prob(functional_call(model, f, (post.obs[i],)), post.actions[i])
        loss = loss + pg.reinforce_loss(lp[None], adv_post[i][None], post.mask[i][None])[0]
    metrics = {"return_pre": pre.returns().mean(1).sum(), "return_post": post.returns().mean(1).sum()}
    return loss, metrics
