"""TRPO's outer step, as the MAML paper takes it for reinforcement learning (appendix A.2): the natural
gradient direction by conjugate gradient on Hessian-vector products of the mean KL divergence, scaled
to the KL bound, then a backtracking line search on the surrogate under that bound.

Parameters, gradients and directions are dicts of tensors (a model's named parameters). Every function
here is pure torch; the products and losses it is given may be sums over workers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from metadist.algorithms.adaptation import Tensors


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """The inner product of two parameter dicts."""
    return sum((a[n] * b[n]).sum() for n in a)


def axpy(alpha: float, x: Tensors, y: Tensors) -> Tensors:
    """alpha * x + y, entry by entry."""
    return {n: alpha * x[n] + y[n] for n in y}


def conjugate_gradient(avp: Callable[[Tensors], Tensors], b: Tensors, iters: int = 10,
                       residual_tol: float = 1e-10, with_product: bool = False):
    """Approximately solve A x = b for a symmetric positive definite A given only as x -> A x. With
    `with_product`, (x, A x): A x is the sum of the products CG already took (x = sum alpha_i p_i), so
    the caller needs no product of its own."""
    x = {n: torch.zeros_like(v) for n, v in b.items()}
    ax = {n: torch.zeros_like(v) for n, v in b.items()}
    r = {n: v.clone() for n, v in b.items()}
    p = {n: v.clone() for n, v in b.items()}
    rr = dot(r, r)
    for _ in range(iters):
        if rr <= residual_tol:
            break
        ap = avp(p)
        alpha = rr / dot(p, ap)
        x = axpy(alpha, p, x)
        ax = axpy(alpha, ap, ax)
        r = axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        p = axpy(rr_new / rr, p, r)
        rr = rr_new
    return (x, ax) if with_product else x


def hvp_exact(f: Callable[[Tensors], torch.Tensor], params: Tensors, v: Tensors) -> Tensors:
    """The Hessian of the scalar f at `params` times `v`, by double backward."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        g = torch.autograd.grad(f(leaves), list(leaves.values()), create_graph=True)
        gv = sum((gi * v[n]).sum() for gi, n in zip(g, leaves))
        hv = torch.autograd.grad(gv, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return {n: h.detach() for n, h in zip(leaves, hv)}


def hvp_finite_difference(f: Callable[[Tensors], torch.Tensor], params: Tensors, v: Tensors,
                          eps: float = 1e-5) -> Tensors:
    """The Hessian of f times `v` by central differences of its gradient along v (the paper's choice,
    after rllab's FiniteDifferenceHvp): the step is eps / |v|, so its size does not depend on v's."""
    r = eps / (math.sqrt(dot(v, v).item()) + 1e-8)

    def grad_at(alpha: float) -> Tensors:
        leaves = {n: (params[n] + alpha * v[n]).detach().requires_grad_() for n in params}
        with torch.enable_grad():
            g = torch.autograd.grad(f(leaves), list(leaves.values()), allow_unused=True, materialize_grads=True)
        return dict(zip(leaves, g))

    plus, minus = grad_at(r), grad_at(-r)
    return {n: (plus[n] - minus[n]) / (2 * r) for n in params}


def diagonal_gaussian_kl(old: torch.Tensor, new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the steps taken of KL(old || new) between diagonal Gaussians, each given as mean and
    log std concatenated on the last dimension (`models.policy.GaussianPolicy`'s output)."""
    m0, s0 = old.chunk(2, dim=-1)
    m1, s1 = new.chunk(2, dim=-1)
    kl = (s1 - s0 + (torch.exp(2 * s0) + (m0 - m1) ** 2) / (2 * torch.exp(2 * s1)) - 0.5).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def natural_step(grad: Tensors, fvp: Callable[[Tensors], Tensors], max_kl: float, cg_iters: int = 10,
                 damping: float = 1e-5) -> Tensors:
    """The full TRPO step for a loss to minimise: -s F^-1 g, with F^-1 g by conjugate gradient on
    (F + damping I) and s = sqrt(2 max_kl / (d' (F + damping I) d)), so that the quadratic KL model
    equals max_kl (the damped product, as rllab's optimizer takes it; CG's own products give it)."""
    direction, product = conjugate_gradient(lambda p: axpy(damping, p, fvp(p)), grad, iters=cg_iters,
                                            with_product=True)
    shs = dot(direction, product).clamp_min(1e-12)
    scale = torch.sqrt(2 * max_kl / shs)
    return {n: -scale * d for n, d in direction.items()}


def line_search(evaluate: Callable[[Tensors], tuple[float, float]], params: Tensors, step: Tensors,
                max_kl: float, max_backtracks: int = 15, backtrack: float = 0.8):
    """Backtracking line search: the first of params + step * backtrack^k (k = 0, 1, ...) that lowers the
    loss and keeps the KL within max_kl, `evaluate(p)` giving both at once (one pass through the inner
    step). Returns (new params, k, loss before, (loss, kl) at the new params); with no such k,
    (params unchanged, None, loss before, (loss before, 0.0))."""
    before, _ = evaluate(params)
    for k in range(max_backtracks):
        candidate = axpy(backtrack ** k, step, params)
        loss, kl = evaluate(candidate)
        if loss < before and kl <= max_kl:
            return candidate, k, before, (loss, kl)
    return params, None, before, (before, 0.0)


def outer_step(params: Tensors, grad: Tensors, fvp: Callable[[Tensors], Tensors],
               evaluate: Callable[[Tensors], tuple[float, float]], max_kl: float, cg_iters: int = 10,
               damping: float = 1e-5, max_backtracks: int = 15, backtrack: float = 0.8):
    """One TRPO step from `params` for a loss with gradient `grad` (mean over tasks), the mean KL's
    Hessian-vector products `fvp` and the (mean loss, mean KL) of candidate parameters `evaluate`:
    (new params, info with the surrogate before and after, the KL and the backtracks taken)."""
    step = natural_step(grad, fvp, max_kl, cg_iters, damping)
    with torch.no_grad():
        new, k, before, (after, kl) = line_search(evaluate, params, step, max_kl, max_backtracks, backtrack)
    return new, {"surrogate_before": before, "surrogate_after": after, "kl": kl,
                 "backtracks": -1 if k is None else k}
