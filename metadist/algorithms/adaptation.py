"""The inner loop shared by MAML, FOMAML, ANIL, Meta-SGD and MAML++, written for one task.

`adapt(...)` runs `spec.steps` gradient steps on the support set and records the query loss after the
steps that matter. It is differentiable end to end (second order) unless `spec.first_order` is set, in
which case each inner gradient is detached: the meta-gradient then ignores the Hessian terms, exactly
first-order MAML. The batching layer vmaps or loops it over tasks.

Meta-parameter naming: model parameters keep their module names (`body.*`, `head.*`); learned inner
learning rates live beside them as `lr/<name>` (Meta-SGD, one rate per element) or `lslr/<name>`
(MAML++ LSLR, one rate per inner step for each parameter tensor).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils.checkpoint import checkpoint

from metadist.algorithms.spec import InnerSpec

Tensors = dict[str, torch.Tensor]

# Set by the batching layer's loop path (`plain_autograd()`): inner gradients then come from plain
# torch.autograd rather than torch.func.grad, whose per-call transform set-up dominated a task's cost.
_PLAIN_AUTOGRAD: ContextVar[bool] = ContextVar("metadist_plain_autograd", default=False)


@contextmanager
def plain_autograd():
    """Within this block, `adapt` takes inner gradients with torch.autograd (no torch.func transform may
    be active around it). The maths is the same: second order unless `spec.first_order`."""
    token = _PLAIN_AUTOGRAD.set(True)
    try:
        yield
    finally:
        _PLAIN_AUTOGRAD.reset(token)


def inner_grad(loss_fn, ad: Tensors, *args, create_graph: bool = True):
    """(d loss_fn(ad, *args)[0] / d ad, loss_fn's aux): torch.func.grad, or torch.autograd under
    `plain_autograd()` (graph kept for the meta-gradient when `create_graph`)."""
    if not _PLAIN_AUTOGRAD.get():
        return grad(loss_fn, has_aux=True)(ad, *args)
    with torch.enable_grad():
        # Outside any meta-gradient (evaluation under no_grad) the weights are not part of a graph yet.
        ad = {n: v if v.requires_grad else v.detach().requires_grad_() for n, v in ad.items()}
        loss, aux = loss_fn(ad, *args)
        g = torch.autograd.grad(loss, list(ad.values()), create_graph=create_graph, allow_unused=True,
                                materialize_grads=True)
    return dict(zip(ad, g)), aux


def model_params(params: Tensors) -> Tensors:
    """The network's own parameters, without learned learning rates."""
    return {n: p for n, p in params.items() if "/" not in n}


def task_loss(out: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(out, y)
    return F.cross_entropy(out, y)


def accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).float().mean()


def step_lr(params: Tensors, name: str, k: int, spec: InnerSpec):
    """The inner learning rate for parameter `name` at inner step `k`."""
    if f"lr/{name}" in params:
        return params[f"lr/{name}"]
    if f"lslr/{name}" in params:
        rates = params[f"lslr/{name}"]
        # Test-time steps beyond those trained reuse the last learned rate.
        return rates[min(k, rates.shape[0] - 1)]
    return spec.later_lr if k > 0 and spec.later_lr is not None else spec.lr


# Reptile's paper (and code) runs Adam with beta1 = 0 in the inner loop.
ADAM_BETAS = (0.0, 0.999)
ADAM_EPS = 1e-8


def inner_update(params: Tensors, ad: Tensors, g: Tensors, k: int, spec: InnerSpec, state=None):
    """`ad` after inner step `k` with gradient `g`, and the optimizer state to pass to step k + 1.

    Gradient descent at `step_lr`, or with `spec.inner_optimizer == "adam"` (Reptile's inner optimizer)
    Adam with beta1 0 and bias correction, whose moments start at zero on every task (`state` None at
    k = 0). The one home of the inner update: training and test-time adaptation take the same step.
    """
    if spec.inner_optimizer != "adam":
        return {n: ad[n] - step_lr(params, n, k, spec) * g[n] for n in ad}, None
    b1, b2 = ADAM_BETAS
    if state is None:
        zeros = {n: torch.zeros_like(x) for n, x in ad.items()}
        state = (zeros, zeros)
    m, v = state
    m = {n: b1 * m[n] + (1 - b1) * g[n] for n in ad}
    v = {n: b2 * v[n] + (1 - b2) * g[n] ** 2 for n in ad}
    c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
    new = {n: ad[n] - step_lr(params, n, k, spec) * (m[n] / c1) / ((v[n] / c2).sqrt() + ADAM_EPS) for n in ad}
    return new, (m, v)


def support_batch(xs: torch.Tensor, ys: torch.Tensor, k: int, spec: InnerSpec):
    """The support examples inner step `k` takes: the whole set, or its mini-batch (`spec.batches`)."""
    if spec.batches is None:
        return xs, ys
    idx = torch.tensor(spec.batches[k], device=xs.device)
    return xs[idx], ys[idx]


class Forward:
    """Calls the model functionally for one task, in the BatchNorm mode and precision the spec asks for,
    with its training-time regularisation (DropBlock) when the spec is a training one."""

    def __init__(self, model: torch.nn.Module, spec: InnerSpec):
        self.model = model
        self.kwargs = {"bn": "running" if spec.bn_eval else "batch", "stats": spec.collect_bn}
        if spec.drop and getattr(model, "drop_rate", 0) > 0:
            self.kwargs["drop"] = True
        self.collect = spec.collect_bn
        self.bf16 = spec.precision == "bf16"

    def __call__(self, params: Tensors, x: torch.Tensor, step: int, part: str = "all"):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = functional_call(self.model, params, (x,), {"step": step, "part": part, **self.kwargs})
        # Calls that pass through no BatchNorm (the head alone, an MLP) return a bare tensor even when
        # statistics are asked for.
        out, stats = out if self.collect and isinstance(out, tuple) else (out, [])
        # Losses (and ANIL's cached features) are float32 under bf16 autocast, as the meta-parameters are.
        return (out.to(x.dtype) if self.bf16 else out), stats


def adapt(model: torch.nn.Module, params: Tensors, xs, ys, xq, yq, spec: InnerSpec):
    """Adapt to one task from `params` and return (meta-objective, aux metrics).

    aux holds `loss_after` (query loss after `spec.steps` steps), `loss_before` (at 0 steps, when
    `spec.report_before` or `spec.track`), `acc_*` for classification, `loss_steps`/`acc_steps` (after every step) when `spec.track` (and the
    query predictions `out_steps` with `spec.keep_outputs`), `diverged`, and
    per-step BatchNorm batch statistics `bn_mean`/`bn_var` in `per_step` training mode.
    """
    fwd = Forward(model, spec)
    fast = model_params(params)
    head_only = spec.adapt == "head"
    if head_only:
        # ANIL: the body is fixed within the task, so its features are computed once; the body still
        # receives meta-gradients through the adapted head.
        xs, body_support_stats = fwd(fast, xs, 0, part="body")
        xq, body_query_stats = fwd(fast, xq, 0, part="body")
        part = "head"
    else:
        part = "all"
    adapted = [n for n in fast if n.startswith("head.")] if head_only else list(fast)

    def support_loss(ad: Tensors, fixed: Tensors, k: int):
        x, y = support_batch(xs, ys, k, spec)
        out, stats = fwd({**fixed, **ad}, x, k, part)
        return task_loss(out, y, spec.loss), stats

    outs = []  # query predictions after each step, kept only for plots (`spec.keep_outputs`)

    def query(p: Tensors, k: int):
        out, stats = fwd(p, xq, k, part)
        if spec.keep_outputs:
            outs.append(out.detach())
        loss = task_loss(out, yq, spec.loss)
        acc = accuracy(out, yq) if spec.loss == "ce" else loss.new_zeros(())
        return loss, acc, stats

    need_every_step = spec.track or spec.msl_weights is not None
    losses, accs, bn_stats = [], [], []
    opt_state = None
    before = spec.report_before or spec.track
    if before:
        with torch.no_grad():
            # Only reported (never part of an objective): no graph, nor its query-sized activations, kept.
            loss0, acc0, _ = query(fast, 0)
        losses.append(loss0)
        accs.append(acc0)

    def inner_step(params: Tensors, fast: Tensors, k: int, opt_state):
        ad = {n: fast[n] for n in adapted}
        g, stats = inner_grad(support_loss, ad, fast, k, create_graph=not spec.first_order)
        if spec.first_order:
            g = {n: v.detach() for n, v in g.items()}
        stepped, opt_state = inner_update(params, ad, g, k, spec, opt_state)
        return stepped, opt_state, stats

    for k in range(spec.steps):
        if spec.checkpoint:
            # Memory-bounded second order: only the step's inputs are kept; its activations (and those of
            # its inner gradient's graph) are recomputed when the meta-gradient's backward reaches it.
            # The tensors go in as arguments, not a closure, so checkpoint sees their devices and
            # replays the random state (DropBlock) and autocast of the first pass exactly.
            stepped, opt_state, stats = checkpoint(inner_step, params, fast, k, opt_state, use_reentrant=False)
        else:
            stepped, opt_state, stats = inner_step(params, fast, k, opt_state)
        bn_stats.append(stats)
        fast = {**fast, **stepped}
        last = k == spec.steps - 1
        if need_every_step or last:
            if spec.checkpoint and not last and not spec.keep_outputs:
                # A multi-step-loss query is recomputed too, or every step would keep a query batch's activations.
                loss_k, acc_k, stats = checkpoint(query, fast, k + 1, use_reentrant=False)
            else:
                loss_k, acc_k, stats = query(fast, k + 1)
            losses.append(loss_k)
            accs.append(acc_k)
    if spec.steps and spec.collect_bn:
        if head_only:
            # Every BatchNorm is in the body, which is the same at every inner step: its support statistics
            # are those of every step, its query statistics those after the last one.
            bn_stats = [body_support_stats] * spec.steps + [body_query_stats]
        else:
            bn_stats.append(stats)  # query statistics after the last step: the running stats of index `steps`

    if spec.msl_weights is not None:
        objective = sum(w * l for w, l in zip(spec.msl_weights, losses[-spec.steps:]))
    else:
        objective = losses[-1]

    final = losses[-1].detach()
    aux = {"loss_after": final, "diverged": (~torch.isfinite(final)).float()}
    if spec.loss == "ce":
        aux["acc_after"] = accs[-1].detach()
    if before:
        aux["loss_before"] = loss0
        if spec.loss == "ce":
            aux["acc_before"] = acc0
    if spec.track:
        aux["loss_steps"] = torch.stack(losses).detach()
        if spec.loss == "ce":
            aux["acc_steps"] = torch.stack(accs).detach()
        if spec.keep_outputs:
            aux["out_steps"] = torch.stack(outs)
    if spec.collect_bn:
        aux.update(bn_aux(bn_stats))
    return objective, aux


def bn_aux(rows: list) -> dict[str, torch.Tensor]:
    """Per-step BatchNorm statistics as aux entries: `bn_mean`/`bn_var` of shape (rows, layers, channels).

    `rows[k]` is the list of per-layer (mean, var) seen after k inner steps; empty when the model has no
    BatchNorm or statistics are not being collected.
    """
    if not rows or not rows[0]:
        return {}
    # Layers of different widths (ResNet-12) are zero-padded to the widest; each reads back its own.
    width = max(m.shape[0] for m, _ in rows[0])

    def stacked(i: int) -> torch.Tensor:
        return torch.stack([torch.stack([F.pad(s[i], (0, width - s[i].shape[0])) for s in r]) for r in rows])
    return {"bn_mean": stacked(0), "bn_var": stacked(1)}
