"""Test-time adaptation curves: query metrics after 0..S inner steps, per task (no meta-gradient)."""

from __future__ import annotations

from functools import partial

import torch

from metadist.algorithms.adaptation import Forward, adapt, model_params, step_lr, task_loss
from metadist.algorithms.batching import map_tasks
from metadist.algorithms.spec import InnerSpec
from metadist.episode import Episode


def _curve(model, spec, params, xs, ys, xq, yq):
    _, aux = adapt(model, params, xs, ys, xq, yq, spec)
    out = {"loss": aux["loss_steps"]}
    if "acc_steps" in aux:
        out["acc"] = aux["acc_steps"]
    return out


def adapt_curve(model, params: dict, batch: Episode, spec: InnerSpec) -> dict[str, torch.Tensor]:
    """{"loss": (T, S+1)[, "acc": (T, S+1)]} for the tasks of `batch`, S = spec.steps."""
    spec = spec.with_(track=True, first_order=True, msl_weights=None)
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        return map_tasks(partial(_curve, model, spec), params, batch, spec)


def adapted_predictions(model, params: dict, xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor,
                        spec: InnerSpec) -> torch.Tensor:
    """Predictions of one task's model on inputs `x` after 0..spec.steps test-time steps on (xs, ys).

    Returns (steps + 1, *prediction shape). Used to draw adapted fits (MAML paper, Figure 2).
    """
    fwd = Forward(model, spec)
    fast = {k: v.detach() for k, v in model_params(params).items()}
    preds = []
    for k in range(spec.steps + 1):
        with torch.no_grad():
            preds.append(fwd(fast, x, k)[0])
        if k == spec.steps:
            break
        with torch.enable_grad():
            leaves = {n: v.requires_grad_() for n, v in ((n, v.clone()) for n, v in fast.items())}
            loss = task_loss(fwd(leaves, xs, k)[0], ys, spec.loss)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        fast = {n: (leaves[n] - step_lr(params, n, k, spec) * g).detach() for n, g in zip(leaves, grads)}
    return torch.stack(preds)
