"""How the tasks of a batch are processed: all at once with `torch.func.vmap`, or one at a time.

Two primitives cover every algorithm:
- `sum_of_grads(task_objective, ...)`: the gradient of the summed per-task objective w.r.t. the shared
  meta-parameters, plus summed per-task aux metrics (MAML family, pretraining).
- `map_tasks(task_fn, ...)`: per-task outputs stacked on a leading task dimension (Reptile's
  adapted-weight differences, evaluation curves).
Both honour `spec.task_parallel` and `spec.chunk`; results do not depend on either beyond
floating-point summation order (random draws inside a task, ResNet-12's DropBlock, are per task under
vmap, `randomness="different"`, and come from the same generator in a different order). Checkpointed
inner steps (`spec.checkpoint`) always take the loop. `choose_task_parallel` measures which of the two is faster
(`task_parallel: auto`).

Both paths differentiate the outer objective with plain torch.autograd: the meta-parameters become leaf
tensors and one backward runs per vmap chunk or per task. Only the inner gradients use torch.func
(`grad` under `vmap`); in the loop they are plain autograd too (`adaptation.plain_autograd`). An outer
`torch.func.grad` would wrap every tensor of the inner loop in one more transform level for nothing.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch
from torch.func import vmap

from metadist.algorithms.adaptation import plain_autograd
from metadist.algorithms.spec import TASK_PARALLEL, InnerSpec
from metadist.episode import Episode

Tensors = dict[str, torch.Tensor]


def _add(acc: Tensors | None, new: Tensors) -> Tensors:
    if acc is None:
        return dict(new)
    return {k: acc[k] + new[k] for k in acc}


def _sum0(d: Tensors) -> Tensors:
    return {k: v.sum(0) for k, v in d.items()}


def _detached(d: Tensors) -> Tensors:
    return {k: v.detach() for k, v in d.items()}


def _leaves(params: Tensors) -> Tensors:
    """Fresh leaves for the meta-gradient (the caller's tensors are neither modified nor kept in a graph)."""
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def _grads_of(objective: torch.Tensor, leaves: Tensors) -> Tensors:
    # A parameter the objective does not reach (the head under pretraining of a body-only loss, say)
    # gets zeros, as torch.func.grad gives.
    g = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, g))


def _task(batch: Episode, t: int):
    return tuple(x[t] for x in batch.tensors())


def sum_of_grads(task_objective: Callable, params: Tensors, batch: Episode, spec: InnerSpec
                 ) -> tuple[Tensors, Tensors]:
    """d/dparams of sum_t objective_t, and the per-task aux dicts summed over tasks."""
    grads: Tensors | None = None
    aux: Tensors | None = None
    leaves = _leaves(params)
    with torch.enable_grad():
        if spec.task_parallel == "loop" or spec.checkpoint:
            # One task at a time, plain autograd throughout (torch.func transforms cannot recompute a
            # checkpointed step's saved tensors). One backward per task rather than over the
            # summed objective: the same work, and only one task's graph (a Conv-4 query batch of
            # activations per inner step) is alive at a time.
            with plain_autograd():
                for t in range(batch.num_tasks):
                    obj, a = task_objective(leaves, *_task(batch, t))
                    grads, aux = _add(grads, _grads_of(obj, leaves)), _add(aux, _detached(a))
            return grads, aux

        # One backward through the whole chunk: the gradient w.r.t. the shared parameters is summed over
        # tasks by autograd itself, without materialising per-task gradients.
        mapped = vmap(task_objective, in_dims=(None,) + (0,) * len(batch.tensors()), randomness="different")
        for part in batch.chunks(spec.chunk):
            obj, a = mapped(leaves, *part.tensors())
            grads, aux = _add(grads, _grads_of(obj.sum(), leaves)), _add(aux, _sum0(_detached(a)))
    return grads, aux


def map_tasks(task_fn: Callable, params: Tensors, batch: Episode, spec: InnerSpec) -> Tensors:
    """task_fn(params, xs, ys, xq, yq) -> dict, evaluated for every task, stacked on dim 0."""
    if spec.task_parallel == "loop":
        with plain_autograd():
            outs = [task_fn(params, *_task(batch, t)) for t in range(batch.num_tasks)]
        return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
    mapped = vmap(task_fn, in_dims=(None,) + (0,) * len(batch.tensors()), randomness="different")
    parts = [mapped(params, *part.tensors()) for part in batch.chunks(spec.chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _sync(batch: Episode) -> None:
    # Accelerator kernels run asynchronously: a timing must wait for them.
    if batch.xs.device.type != "cpu":
        torch.accelerator.synchronize(batch.xs.device)


def choose_task_parallel(fn: Callable, model, params: Tensors, batch: Episode, spec: InnerSpec,
                         repeats: int = 3) -> str:
    """`vmap` or `loop`, whichever runs `fn(model, params, batch, spec)` faster here.

    Each mode is called once to warm up (allocator, kernel selection, lazy initialisation), then both are
    timed `repeats` times, alternating, so background load falls on both alike; the lower median wins.
    A mode that raises on the warm-up call (an operation without a vmap rule, say) is not a candidate.
    """
    candidates: dict[str, InnerSpec] = {}
    failures: dict[str, Exception] = {}
    for mode in TASK_PARALLEL:
        s = spec.with_(task_parallel=mode)
        try:
            fn(model, params, batch, s)
            _sync(batch)
        except (RuntimeError, NotImplementedError) as e:
            failures[mode] = e
            continue
        candidates[mode] = s
    if not candidates:
        raise failures["vmap"]
    for mode, e in failures.items():
        warnings.warn(f"task_parallel={mode} failed for this model, so auto does not consider it: {e}")
    times: dict[str, list[float]] = {mode: [] for mode in candidates}
    for _ in range(max(repeats, 1)):
        for mode, s in candidates.items():
            start = time.perf_counter()
            fn(model, params, batch, s)
            _sync(batch)
            times[mode].append(time.perf_counter() - start)
    return min(times, key=lambda mode: statistics.median(times[mode]))
