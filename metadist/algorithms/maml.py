"""MAML (second order), FOMAML, ANIL and Meta-SGD, plus the MAML++ options, as pure functions.

All share one signature, `(model, params, batch, spec) -> (summed meta-gradients, summed metrics)`:
gradients and metrics are sums over the tasks of `batch`, so a worker can compute a shard and the
driver can add shards and divide by the task count. They differ only in the spec (first order,
head-only adaptation) and in which learned rates `params` carries (`lr/*` for Meta-SGD, `lslr/*`).
"""

from __future__ import annotations

from functools import partial

import torch

from metadist.algorithms.adaptation import Forward, adapt, bn_aux, task_loss
from metadist.algorithms.batching import sum_of_grads
from metadist.algorithms.spec import InnerSpec
from metadist.episode import Episode

Tensors = dict[str, torch.Tensor]


def _with_count(grads: Tensors, aux: Tensors, batch: Episode):
    aux = dict(aux)
    aux["tasks"] = torch.tensor(float(batch.num_tasks))
    return grads, aux


def maml(model, params: Tensors, batch: Episode, spec: InnerSpec):
    """Second-order MAML: differentiates through every inner step (unless spec.first_order)."""
    objective = partial(_objective, model, spec)
    return _with_count(*sum_of_grads(objective, params, batch, spec), batch)


def fomaml(model, params: Tensors, batch: Episode, spec: InnerSpec):
    """First-order MAML: inner gradients are constants in the meta-gradient."""
    return maml(model, params, batch, spec.with_(first_order=True))


def anil(model, params: Tensors, batch: Episode, spec: InnerSpec):
    """ANIL: only the head adapts in the inner loop; the body is meta-learned through it."""
    return maml(model, params, batch, spec.with_(adapt="head"))


def metasgd(model, params: Tensors, batch: Episode, spec: InnerSpec):
    """Meta-SGD: MAML with one learned inner learning rate per parameter element (`lr/*` params)."""
    missing = [n for n in params if "/" not in n and f"lr/{n}" not in params]
    if missing:
        raise ValueError(f"metasgd needs learned rates lr/<name> for every parameter; missing {missing[:3]}")
    return maml(model, params, batch, spec)


def _objective(model, spec: InnerSpec, params, xs, ys, xq, yq):
    return adapt(model, params, xs, ys, xq, yq, spec)


def pretrain(model, params: Tensors, batch: Episode, spec: InnerSpec):
    """The MAML paper's baseline: plain training on all tasks jointly (no inner loop).

    Each task contributes the gradient of its loss on support and query points together. In per_step
    BatchNorm mode its one set of batch statistics is reported as row 0 (every test step reuses it).
    """
    fwd = Forward(model, spec)

    def objective(p, xs, ys, xq, yq):
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        out, stats = fwd(p, x, 0)
        loss = task_loss(out, y, spec.loss)
        return loss, {"loss_before": loss.detach(), "loss_after": loss.detach(),
                      "diverged": (~torch.isfinite(loss)).float().detach(), **bn_aux([stats])}
    return _with_count(*sum_of_grads(objective, params, batch, spec), batch)
