"""`InnerSpec`: everything an algorithm needs to know for one call, as plain values.

The trainer builds a spec per outer step from the run config (`make_spec`). Schedules that depend on
the outer step (MAML++ derivative-order annealing and multi-step-loss weights) are resolved here, so
the algorithm functions themselves stay pure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

TASK_PARALLEL = ("vmap", "loop")


@dataclass(frozen=True)
class InnerSpec:
    loss: str = "mse"
    """`mse` (regression), `ce` (classification, also reports accuracy) or `pg` (reinforcement learning:
    the REINFORCE surrogate of sampled trajectories)."""
    steps: int = 1
    """Inner gradient steps."""
    lr: float = 0.01
    """Inner learning rate where it is not learned."""
    first_order: bool = False
    """Treat inner gradients as constants in the meta-gradient."""
    msl_weights: tuple[float, ...] | None = None
    """Multi-step loss: weight of the query loss after each inner step 1..steps (None: final only)."""
    track: bool = False
    """Also report the query metrics after every inner step (costs one query forward per step)."""
    report_before: bool = True
    """Report the query loss (and accuracy) before adaptation. It costs one extra query forward per task,
    about a tenth of a Conv-4 meta-gradient, so the trainer asks for it on logging steps only."""
    bn: str = "transductive"
    """BatchNorm mode: `transductive` or `per_step` (see metadist.models.norm)."""
    bn_eval: bool = False
    """Normalise with per-step running statistics (per_step mode at test time)."""
    task_parallel: str = "vmap"
    """`vmap` or `loop`. The config's `auto` is resolved once by the runtime (by timing both) before any
    spec is made, so evaluation runs in the mode training measured faster."""
    chunk: int = 0
    """Tasks per vmap call (0: all)."""
    adapt: str = "all"
    """Parameters adapted in the inner loop: `all`, or `head` (ANIL)."""
    inner_optimizer: str = "sgd"
    """Reptile's inner optimizer, `sgd` or `adam`."""
    later_lr: float | None = None
    """The rate of inner steps after the first where it is not learned (None: `lr`); the MAML paper's RL
    evaluation halves it."""
    gamma: float = 0.99
    """`pg`: the discount of the returns behind the baseline and the advantages."""
    gae_lambda: float = 1.0
    """`pg`: generalised advantage estimation's lambda."""
    batches: tuple[tuple[int, ...], ...] | None = None
    """Support indices each inner step takes (`minibatch_order`); None: the whole support set each step."""
    checkpoint: bool = False
    """Recompute each inner step's activations in the backward pass instead of keeping them (memory no
    longer grows with the steps; the meta-gradient is the same). It needs plain autograd, so the
    meta-gradient then takes the tasks one at a time whatever `task_parallel` says."""
    precision: str = "fp32"
    """`fp32`, or `bf16`: forward passes under bfloat16 autocast (parameters and losses stay float32)."""
    drop: bool = False
    """Training-time regularisation (ResNet-12's DropBlock) is on: meta-training, never evaluation."""
    keep_outputs: bool = False
    """With `track`, also return the query predictions after every inner step (`out_steps`), for plots
    drawn from exactly the adaptation that evaluation runs."""

    def __post_init__(self) -> None:
        if self.task_parallel not in TASK_PARALLEL:
            # Anything else used to run as vmap silently; `auto` must be resolved before specs are made.
            raise ValueError(f"InnerSpec.task_parallel: got {self.task_parallel!r}; allowed: "
                             f"{', '.join(TASK_PARALLEL)} (resolve `auto` with the runtime first)")

    @property
    def collect_bn(self) -> bool:
        return self.bn == "per_step" and not self.bn_eval

    def with_(self, **kw) -> "InnerSpec":
        return replace(self, **kw)


def msl_weights(steps: int, outer_step: int, anneal_steps: int) -> tuple[float, ...]:
    """MAML++ multi-step loss weights: uniform at first, annealed towards the final step.

    Follows the reference implementation: non-final weights decay linearly to 0.03/steps, the final
    weight grows to take up the rest, over `anneal_steps` outer steps.
    """
    if steps == 1:
        return (1.0,)
    w = [1.0 / steps] * steps
    progress = min(outer_step / max(anneal_steps, 1), 1.0)
    decay = progress / steps
    floor = 0.03 / steps
    for i in range(steps - 1):
        w[i] = max(w[i] - decay, floor)
    w[-1] = min(w[-1] + decay * (steps - 1), 1.0 - (steps - 1) * floor)
    return tuple(w)


def minibatch_order(n: int, batch: int, steps: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """`steps` mini-batches of `batch` indices into a support set of `n`, as the Reptile code draws them
    without replacement: the set in a random order, taken `batch` at a time, and a new random order when it
    runs out (a batch may span two orders). A pure function of `seed`."""
    gen = torch.Generator().manual_seed(seed)
    order: list[tuple[int, ...]] = []
    current: list[int] = []
    while len(order) < steps:
        for i in torch.randperm(n, generator=gen).tolist():
            current.append(i)
            if len(current) == batch:
                order.append(tuple(current))
                current = []
                if len(order) == steps:
                    break
    return tuple(order)


# Seeds of the mini-batch orders: (run seed, outer step) in training, a salt of their own at test time.
_ORDER_STRIDE = 1 << 32
_EVAL_ORDER = _ORDER_STRIDE - 1


def make_spec(cfg, outer_step: int = 0, track: bool = False, task_parallel: str | None = None,
              checkpoint: bool | None = None) -> InnerSpec:
    """The spec for training step `outer_step` of run config `cfg`. `task_parallel` and `checkpoint` are
    the resolved values where the config says `auto` (an unresolved `inner.checkpoint: auto` is off)."""
    algo = cfg.algorithm
    first_order = algo.name == "fomaml" or outer_step < algo.first_order_until
    loss = "pg" if cfg.task.rl else {"sinusoid": "mse"}.get(cfg.task.family, "ce")
    lr = cfg.inner.lr
    if loss == "pg" and algo.name == "pretrain":
        # Pretraining under TRPO is MAML-RL with no inner step: the "adapted" policy is the policy itself,
        # so the surrogate and the KL are plain TRPO's on its own trajectories.
        lr, first_order = 0.0, True
    return InnerSpec(
        loss=loss,
        steps=cfg.inner.steps,
        lr=lr,
        first_order=first_order,
        msl_weights=msl_weights(cfg.inner.steps, outer_step, algo.msl_anneal_steps) if algo.msl else None,
        track=track,
        bn=getattr(cfg.model, "bn", "transductive"),
        task_parallel=task_parallel or algo.task_parallel,
        checkpoint=cfg.inner.checkpoint is True if checkpoint is None else checkpoint,
        precision=cfg.runtime.precision,
        drop=True,
        chunk=algo.chunk,
        adapt="head" if algo.name == "anil" else "all",
        inner_optimizer=algo.reptile_optimizer if algo.name == "reptile" else "sgd",
        gamma=cfg.rl.gamma,
        gae_lambda=cfg.rl.gae_lambda,
        batches=(minibatch_order(cfg.support_size(cfg.task.shots), cfg.inner.batch, cfg.inner.steps,
                                 cfg.seed * _ORDER_STRIDE + outer_step) if cfg.inner.batch else None),
    )


def make_eval_spec(cfg, steps: int | None = None, task_parallel: str | None = None) -> InnerSpec:
    """The spec for test-time adaptation: `eval.steps` steps at `eval.lr`, statistics per step."""
    spec = make_spec(cfg, outer_step=cfg.train.steps, track=True, task_parallel=task_parallel)
    lr = cfg.eval.lr or cfg.inner.lr
    steps = cfg.eval.steps if steps is None else steps
    batches = (minibatch_order(cfg.support_size(cfg.eval.shots or cfg.task.shots), cfg.eval.inner_batch, steps,
                               cfg.seed * _ORDER_STRIDE + _EVAL_ORDER) if cfg.eval.inner_batch else None)
    return spec.with_(steps=steps, batches=batches,
                      lr=lr, later_lr=lr * cfg.eval.later_lr_scale, first_order=True, msl_weights=None,
                      bn_eval=spec.bn == "per_step", chunk=cfg.eval.batch,
                      # Test-time adaptation is first order (no graph to bound) and never regularised.
                      checkpoint=False, drop=False,
                      # Reptile adapts test tasks with its own inner optimizer, as its code does (Adam at
                      # 1e-3 for 50 steps); every other algorithm by gradient descent.
                      inner_optimizer=spec.inner_optimizer)
