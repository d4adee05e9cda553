"""Reptile (Nichol et al. 2018) as a pure function.

For each task, k steps of SGD or Adam on the support set move theta to W. The returned "meta-gradient"
is sum_t (theta - W_t); the driver divides by the task count, so an outer SGD step of size epsilon gives
theta <- theta - epsilon * mean(theta - W) = theta + epsilon * (mean W - theta), Reptile's update.
"""

from __future__ import annotations

from functools import partial

import torch

from metadist.algorithms.adaptation import (Forward, bn_aux, inner_grad, inner_update, model_params, support_batch,
                                            task_loss)
from metadist.algorithms.batching import map_tasks
from metadist.algorithms.spec import InnerSpec
from metadist.episode import Episode

Tensors = dict[str, torch.Tensor]


def _task(model, spec: InnerSpec, params, xs, ys, xq, yq):
    fwd = Forward(model, spec)
    theta = model_params(params)
    w = dict(theta)

    def loss_at(p, k):
        x, y = support_batch(xs, ys, k, spec)
        out, stats = fwd(p, x, k)
        return task_loss(out, y, spec.loss), stats

    opt_state = None
    before = task_loss(fwd(w, xq, 0)[0], yq, spec.loss) if spec.report_before else None
    bn_rows = []  # per_step mode: support statistics at each inner step, then the final query's
    for k in range(spec.steps):
        g, stats = inner_grad(loss_at, w, k, create_graph=False)
        bn_rows.append(stats)
        w, opt_state = inner_update(params, w, g, k, spec, opt_state)
    out_q, stats = fwd(w, xq, spec.steps)
    after = task_loss(out_q, yq, spec.loss)
    out = {f"grad.{n}": theta[n] - w[n] for n in theta}
    out.update(loss_after=after, diverged=(~torch.isfinite(after)).float(), **bn_aux(bn_rows + [stats]))
    if before is not None:
        out["loss_before"] = before
    return out


def reptile(model, params: Tensors, batch: Episode, spec: InnerSpec):
    """Summed (theta - W_t) over the tasks of `batch`, and summed metrics."""
    with torch.no_grad():
        per_task = map_tasks(partial(_task, model, spec), params, batch, spec)
    summed = {k: v.sum(0) for k, v in per_task.items()}
    grads = {k[len("grad."):]: v for k, v in summed.items() if k.startswith("grad.")}
    metrics = {k: v for k, v in summed.items() if not k.startswith("grad.")}
    metrics["tasks"] = torch.tensor(float(batch.num_tasks))
    return grads, metrics
