"""How the tasks of a batch are processed: all at once with `torch.func.vmap`, or one at a time.

Two primitives cover every algorithm:
- `sum_of_grads(task_objective, ...)`: the gradient of the summed per-task objective w.r.t. the shared
  meta-parameters, plus summed per-task aux metrics (MAML family, pretraining).
- `map_tasks(task_fn, ...)`: per-task outputs stacked on a leading task dimension (Reptile's
  adapted-weight differences, evaluation curves).
Both honour `spec.task_parallel` and `spec.chunk`; results do not depend on either beyond
floating-point summation order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, vmap

from metadist.algorithms.spec import InnerSpec
from metadist.tasks.episode import Episode

Tensors = dict[str, torch.Tensor]


def _add(acc: Tensors | None, new: Tensors) -> Tensors:
    if acc is None:
        return dict(new)
    return {k: acc[k] + new[k] for k in acc}


def _sum0(d: Tensors) -> Tensors:
    return {k: v.sum(0) for k, v in d.items()}


def sum_of_grads(task_objective: Callable, params: Tensors, batch: Episode, spec: InnerSpec
                 ) -> tuple[Tensors, Tensors]:
    """d/dparams of sum_t objective_t, and the per-task aux dicts summed over tasks."""
    grads: Tensors | None = None
    aux: Tensors | None = None
    if spec.task_parallel == "loop":
        per_task = grad(task_objective, has_aux=True)
        for t in range(batch.num_tasks):
            g, a = per_task(params, *(x[t] for x in batch.tensors()))
            grads, aux = _add(grads, g), _add(aux, a)
        return grads, aux

    # One backward through the whole chunk: the gradient w.r.t. the shared parameters is summed over
    # tasks by autograd itself, without materialising per-task gradients.
    def chunk_total(p, xs, ys, xq, yq):
        obj, a = vmap(task_objective, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq)
        return obj.sum(), _sum0(a)

    total = grad(chunk_total, has_aux=True)
    for part in batch.chunks(spec.chunk):
        g, a = total(params, *part.tensors())
        grads, aux = _add(grads, g), _add(aux, a)
    return grads, aux


def map_tasks(task_fn: Callable, params: Tensors, batch: Episode, spec: InnerSpec) -> Tensors:
    """task_fn(params, xs, ys, xq, yq) -> dict, evaluated for every task, stacked on dim 0."""
    if spec.task_parallel == "loop":
        outs = [task_fn(params, *(x[t] for x in batch.tensors())) for t in range(batch.num_tasks)]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    mapped = vmap(task_fn, in_dims=(None, 0, 0, 0, 0))
    parts = [mapped(params, *part.tensors()) for part in batch.chunks(spec.chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
