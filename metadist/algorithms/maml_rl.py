"""MAML for reinforcement learning on batched environments (MAML paper, section 5.3): sample each task's
trajectories, adapt with one differentiable policy-gradient step per task, sample again with the adapted
policy, and differentiate the post-update surrogate through the inner step.

The task batch (`tasks.rl.RLBatch`) carries its environment, goals and sampling rounds' randomness; it
is handed in, so this module stays pure torch. Sampling never builds a graph: the policy gradient needs
only the actions' log-likelihood, recomputed from the stored observations and actions. The inner step is
`policy_gradient.adapt_policy` (the spec decides first or second order, ANIL's head-only step, learned
rates), and tasks are vmapped or looped by the same `batching` layer as the supervised algorithms.

`maml` has the supervised algorithms' shape, summed gradients and summed metrics, so every executor
runs it unchanged with Adam outside. The TRPO outer step also needs sums over tasks of the
adapted policies' KL Hessian-vector products (`fvp`) and of the surrogate and KL at candidate
parameters (`surrogate`), on the same trajectories (`Samples`), which a worker keeps for the step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
from torch.func import functional_call, vmap

from metadist.algorithms import policy_gradient as pg
from metadist.algorithms import trpo
from metadist.algorithms.adaptation import Tensors, model_params
from metadist.algorithms.batching import map_tasks, sum_of_grads
from metadist.algorithms.spec import InnerSpec


def policy_act(model, params: Tensors, per_task: bool = False):
    """The sampling function `act(obs, noise)` of a Gaussian policy: mean + std * noise. With
    `per_task`, every parameter has a leading task dimension (adapted policies), matched to obs's."""
    params = {n: p.detach() for n, p in model_params(params).items()}

    def one(p: Tensors, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean, log_std = functional_call(model, p, (obs,)).chunk(2, dim=-1)
        return mean + log_std.exp() * z

    if per_task:
        return lambda obs, z: vmap(one)(params, obs, z)
    return lambda obs, z: one(params, obs, z)


def adapt_tasks(model, params: Tensors, obs, actions, adv, mask, spec: InnerSpec, k: int,
                per_task: bool = False) -> Tensors:
    """Every task's parameters after inner step `k` on its trajectories (T, N, H, ...), stacked on a
    leading task dimension, without a graph (for sampling and evaluation). With `per_task`, `params`
    already has a task dimension (a later step)."""
    spec = spec.with_(first_order=True)
    params = {n: p.detach() for n, p in params.items()}
    one = partial(pg.adapt_policy, model, spec=spec, k=k)
    with torch.no_grad():
        return vmap(one, in_dims=(0 if per_task else None, 0, 0, 0, 0))(params, obs, actions, adv, mask)


@dataclass
class Samples:
    """One outer step's trajectories, per task (leading dimension T): those each inner step learns from
    (`pre_*`, a round dimension after the tasks', one round per step), those of the adapted policy
    (`post_*`), their advantages, and the adapted policies' outputs on the post-update
    observations when they sampled (`old_out`: the TRPO surrogate's "old" policy). `metrics` holds
    the summed mean returns per task before and after the step."""

    pre_obs: torch.Tensor
    pre_actions: torch.Tensor
    pre_adv: torch.Tensor
    pre_mask: torch.Tensor
    post_obs: torch.Tensor
    post_actions: torch.Tensor
    post_adv: torch.Tensor
    post_mask: torch.Tensor
    old_out: torch.Tensor
    metrics: dict

    @property
    def num_tasks(self) -> int:
        return self.pre_obs.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "metrics")

    def chunks(self, size: int) -> list["Samples"]:
        """Consecutive pieces of at most `size` tasks (size 0: one piece), as `batching` asks."""
        if size <= 0 or size >= self.num_tasks:
            return [self]
        return [Samples(*(t[i:i + size] for t in self.tensors()), {})
                for i in range(0, self.num_tasks, size)]


def sample(model, params: Tensors, batch, spec: InnerSpec) -> Samples:
    """Sample each task's trajectories with `params`, take its `spec.steps` inner steps without a graph,
    each on the trajectories of the policy before it (`rounds`), and sample with the adapted policy."""
    *pre, (post, post_adv, fast, _) = rounds(model, params, batch, spec, spec.steps)
    with torch.no_grad():
        old_out = vmap(lambda f, o: functional_call(model, f, (o,)))(model_params(fast), post.obs)
    stack = lambda xs: torch.stack(xs, 1)  # noqa: E731  rounds on dimension 1, after the tasks
    metrics = {"return_before": pre[0][0].returns().mean(1).sum(), "return_after": post.returns().mean(1).sum()}
    return Samples(stack([r.obs for r, *_ in pre]), stack([r.actions for r, *_ in pre]),
                   stack([a for _, a, *_ in pre]), stack([r.mask for r, *_ in pre]),
                   post.obs, post.actions, post_adv, post.mask, old_out, metrics)


def _adapted(model, spec: InnerSpec, params: Tensors, pre_obs, pre_actions, pre_adv, pre_mask) -> Tensors:
    # One task's policy after its inner steps, step k on its round-k trajectories (leading dimension),
    # a function of `params`; learned rates travel with the adapted weights.
    rates = {n: v for n, v in params.items() if "/" in n}
    fast = params
    for k in range(pre_obs.shape[0]):
        fast = {**pg.adapt_policy(model, fast, pre_obs[k], pre_actions[k], pre_adv[k], pre_mask[k], spec, k), **rates}
    return model_params(fast)


def _surrogate_loss(out, old_out, actions, adv, mask) -> torch.Tensor:
    # -mean(ratio * advantage) over each task's steps taken (the last two dimensions: trajectories, steps).
    ratio = torch.exp(pg.gaussian_log_prob(out, actions) - pg.gaussian_log_prob(old_out, actions))
    return -(ratio * adv * mask).sum((-2, -1)) / mask.sum((-2, -1)).clamp_min(1)


def _terms(model, spec: InnerSpec, params, pre_obs, pre_actions, pre_adv, pre_mask, post_obs, post_actions,
           post_adv, post_mask, old_out):
    """One task's (importance-weighted surrogate -mean(ratio * advantage) on its post-update
    trajectories, mean KL from its sampling-time adapted policy), both functions of `params` through the
    inner step. At the sampling parameters the ratio is 1 and the surrogate's gradient is the REINFORCE
    meta-gradient."""
    out = functional_call(model, _adapted(model, spec, params, pre_obs, pre_actions, pre_adv, pre_mask), (post_obs,))
    return (_surrogate_loss(out, old_out, post_actions, post_adv, post_mask),
            trpo.diagonal_gaussian_kl(old_out, out, post_mask))


def _surrogate_objective(model, spec, params, *task):
    loss, kl = _terms(model, spec, params, *task)
    return loss, {"kl": kl.detach()}


def _with_metrics(grads: Tensors, returns: dict, n: int):
    # The loss the trainer shows and checks for divergence: minus the post-update return.
    return grads, {"tasks": torch.tensor(float(n)), "loss_after": -returns["return_after"], **returns}


def maml(model, params: Tensors, batch, spec: InnerSpec):
    """MAML-RL's meta-gradient in the supervised algorithms' shape, (summed gradients, summed metrics),
    of one fresh batch: the gradient of the post-update surrogate summed over tasks, through the inner
    step (second order unless spec.first_order). First order, ANIL and Meta-SGD come from the spec and
    the learned rates in `params`."""
    samples = sample(model, params, batch, spec)
    grads, _ = sum_of_grads(partial(_surrogate_objective, model, spec), params, samples, spec)
    return _with_metrics(grads, samples.metrics, batch.num_tasks)


def trpo_start(model, params: Tensors, batch, spec: InnerSpec):
    """The first part of a TRPO outer step on one fresh batch: (summed meta-gradients, summed metrics,
    the `Curvature` whose products and the samples the rest of the step uses). The gradient is `maml`'s,
    taken from the kept graph."""
    samples = sample(model, params, batch, spec)
    curvature = Curvature(model, params, samples, spec)
    return *_with_metrics(curvature.grad(), samples.metrics, batch.num_tasks), curvature


def pretrain(model, params: Tensors, batch, spec: InnerSpec):
    """The MAML paper's "pretrained" baseline: one policy trained on all tasks jointly by the policy
    gradient of its own trajectories (no inner step)."""
    pre, adv, *_ = next(rounds(model, params, batch, spec, 0))
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        lp = pg.gaussian_log_prob(functional_call(model, model_params(leaves), (pre.obs,)), pre.actions)
        loss = pg.reinforce_loss(lp, adv, pre.mask).sum()
        g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    ret = pre.returns().mean(1).sum()
    return _with_metrics(dict(zip(leaves, g)), {"return_before": ret, "return_after": ret}, batch.num_tasks)


def kl_sum(model, params: Tensors, samples: Samples, spec: InnerSpec) -> torch.Tensor:
    """The adapted policies' KL summed over the tasks of `samples`, a differentiable function of `params`."""
    return map_tasks(lambda p, *task: {"kl": _terms(model, spec, p, *task)[1]}, params, samples, spec)["kl"].sum()


def _post_outputs(model, spec: InnerSpec, params, pre_obs, pre_actions, pre_adv, pre_mask, post_obs, *_):
    # One task's adapted policy's outputs on its post-update observations, a function of `params`.
    return {"out": functional_call(model, _adapted(model, spec, params, pre_obs, pre_actions, pre_adv, pre_mask),
                                   (post_obs,))}


class Curvature:
    """TRPO's products at the sampling parameters, from one graph kept for the whole outer step.

    The surrogate and the KL depend on `params` only through the adapted policies' outputs on the
    post-update observations, out(params). So the meta-gradient is J' dL/dout, and, because the KL of the
    sampling policies from themselves is zero with a zero gradient in out, the KL's Hessian there is
    exactly J' H J, H the KL's (diagonal) Hessian in out: 1/std^2 for a mean, 2 for a log std, each
    weighted by the step's share of its task's steps. The forward pass through the inner step and the
    graph of J'u (J v is the gradient of (J'u)'v in u) are built once; each product is then two passes
    over kept graphs instead of a double backward from scratch."""

    def __init__(self, model, params: Tensors, samples: Samples, spec: InnerSpec):
        self.model, self.params, self.spec = model, params, spec
        self.leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad():
            self.out = map_tasks(partial(_post_outputs, model, spec), self.leaves, samples, spec)["out"]
            self.u0 = torch.zeros_like(self.out, requires_grad=True)
            self.jt_u0 = torch.autograd.grad(self.out, list(self.leaves.values()), self.u0, create_graph=True,
                                             allow_unused=True, materialize_grads=True)
        log_std = samples.old_out.chunk(2, dim=-1)[1]
        share = samples.post_mask / samples.post_mask.sum((1, 2), keepdim=True).clamp_min(1)
        self.h = torch.cat([torch.exp(-2 * log_std), torch.full_like(log_std, 2.0)], -1) * share[..., None]
        self.samples = samples

    def _vjp(self, u: torch.Tensor) -> Tensors:
        g = torch.autograd.grad(self.out, list(self.leaves.values()), u, retain_graph=True, allow_unused=True,
                                materialize_grads=True)
        return dict(zip(self.leaves, g))

    def fvp(self, v: Tensors, hvp: str = "exact", fd_eps: float = 1e-5) -> Tensors:
        """The Hessian of the KL summed over tasks, at the sampling parameters, times `v`: `exact`, or by
        `finite_difference` of the KL's gradient (module `fvp`, from scratch each time)."""
        if hvp != "exact":
            return fvp(self.model, self.params, self.samples, self.spec, v, hvp, fd_eps)
        with torch.enable_grad():
            jt_u0_v = sum((g * v[n]).sum() for g, n in zip(self.jt_u0, self.leaves))
            jv, = torch.autograd.grad(jt_u0_v, self.u0, retain_graph=True)
            return {n: g.detach() for n, g in self._vjp(self.h * jv).items()}

    def grad(self) -> Tensors:
        """The surrogate's gradient summed over tasks at the sampling parameters: the meta-gradient."""
        s = self.samples
        out = self.out.detach().requires_grad_()
        with torch.enable_grad():
            loss = _surrogate_loss(out, s.old_out, s.post_actions, s.post_adv, s.post_mask).sum()
            dout, = torch.autograd.grad(loss, out)
            return {n: g.detach() for n, g in self._vjp(dout).items()}


def fvp(model, params: Tensors, samples: Samples, spec: InnerSpec, v: Tensors, hvp: str = "exact",
        fd_eps: float = 1e-5) -> Tensors:
    """The Hessian of `kl_sum` at `params` times `v`: `exact` by double backward through the inner step,
    or by `finite_difference` of its gradient. The exact product is the default: through the inner step
    the KL's gradient jumps where a ReLU of the policy switches, and a finite difference that straddles
    one is wrong. On a 32-32 policy in float64 the finite-difference product was 28% off the exact one
    at fd_eps 1e-5, 3% at 1e-4, and 6e-10 at 1e-6; in float32, rounding rules out the small steps.
    (At the sampling parameters, `Curvature` gives the exact product faster.)"""
    f = partial(kl_sum, model, samples=samples, spec=spec)
    if hvp == "exact":
        return trpo.hvp_exact(f, params, v)
    return trpo.hvp_finite_difference(f, params, v, eps=fd_eps)


def surrogate(model, params: Tensors, samples: Samples, spec: InnerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate summed over tasks, KL summed over tasks) at candidate `params`, without a graph."""
    with torch.no_grad():
        out = map_tasks(lambda p, *task: dict(zip(("loss", "kl"), _terms(model, spec, p, *task))),
                        {n: p.detach() for n, p in params.items()}, samples, spec)
    return out["loss"].sum(), out["kl"].sum()


def rounds(model, params: Tensors, batch, spec: InnerSpec, steps: int):
    """Sampling rounds 0..steps, each as (rollouts, their advantages, the sampling policy's parameters,
    whether those have a task dimension): round k with each task's policy after k inner steps, step k
    taken without a graph on round k's trajectories (training's sampling, and the MAML paper's RL
    evaluation: fresh trajectories after every step)."""
    fast, per_task = params, False
    # The learned rates (Meta-SGD, LSLR) travel with each task's adapted parameters after the first step.
    rates = {n: v for n, v in params.items() if "/" in n}
    for k in range(steps + 1):
        roll = batch.rollout(policy_act(model, fast, per_task), k)
        adv = pg.advantages(roll.obs, roll.rewards, roll.mask, spec.gamma, spec.gae_lambda)
        yield roll, adv, fast, per_task
        if k == steps:
            return
        if per_task:
            fast = {**fast, **{n: v.expand(batch.num_tasks, *v.shape) for n, v in rates.items()}}
        fast = adapt_tasks(model, fast, roll.obs, roll.actions, adv, roll.mask, spec, k, per_task=per_task)
        per_task = True


def curves(model, params: Tensors, batch, spec: InnerSpec) -> dict[str, torch.Tensor]:
    """{"return": (T, S+1)}: each task's mean undiscounted return per trajectory after 0..spec.steps
    inner steps, on fresh trajectories after every step (`rounds`)."""
    return {"return": torch.stack([r.returns().mean(1) for r, *_ in rounds(model, params, batch, spec, spec.steps)], 1)}


def trajectories(model, params: Tensors, batch, spec: InnerSpec, steps: tuple[int, ...] = (0, 1)) -> dict:
    """{k: (positions (T, H, 2), mask (T, H))} of each task's first trajectory after k inner steps, for
    k in `steps`: the data of the paper's qualitative figure."""
    return {k: (r.obs[:, 0], r.mask[:, 0]) for k, (r, *_) in enumerate(rounds(model, params, batch, spec, max(steps)))
            if k in steps}
