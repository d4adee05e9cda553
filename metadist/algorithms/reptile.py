"""Reptile (Nichol et al. 2018) as a pure function.

For each task, k steps of SGD or Adam on the support set move theta to W. The returned "meta-gradient"
is sum_t (theta - W_t); the driver divides by the task count, so an outer SGD step of size epsilon gives
theta <- theta - epsilon * mean(theta - W) = theta + epsilon * (mean W - theta), Reptile's update.
"""

from __future__ import annotations

from functools import partial

import torch

from metadist.algorithms.adaptation import Forward, bn_aux, inner_grad, model_params, task_loss
from metadist.algorithms.batching import map_tasks
from metadist.algorithms.spec import InnerSpec
from metadist.episode import Episode

Tensors = dict[str, torch.Tensor]

# Reptile's paper runs Adam with beta1 = 0 in the inner loop.
ADAM_BETAS = (0.0, 0.999)
ADAM_EPS = 1e-8


def _task(model, spec: InnerSpec, params, xs, ys, xq, yq):
    fwd = Forward(model, spec)
    theta = model_params(params)
    w = dict(theta)

    def loss_at(p, k):
        out, stats = fwd(p, xs, k)
        return task_loss(out, ys, spec.loss), stats

    m = {n: torch.zeros_like(v) for n, v in w.items()}
    v2 = {n: torch.zeros_like(v) for n, v in w.items()}
    b1, b2 = ADAM_BETAS
    before = task_loss(fwd(w, xq, 0)[0], yq, spec.loss) if spec.report_before else None
    bn_rows = []  # per_step mode: support statistics at each inner step, then the final query's
    for k in range(spec.steps):
        g, stats = inner_grad(loss_at, w, k, create_graph=False)
        bn_rows.append(stats)
        if spec.inner_optimizer == "adam":
            m = {n: b1 * m[n] + (1 - b1) * g[n] for n in w}
            v2 = {n: b2 * v2[n] + (1 - b2) * g[n] ** 2 for n in w}
            c1, c2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
            w = {n: w[n] - spec.lr * (m[n] / c1) / ((v2[n] / c2).sqrt() + ADAM_EPS) for n in w}
        else:
            w = {n: w[n] - spec.lr * g[n] for n in w}
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
