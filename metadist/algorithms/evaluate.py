"""Test-time adaptation curves: query metrics after 0..S inner steps, per task (no meta-gradient)."""

from __future__ import annotations

from functools import partial

import torch

from metadist.algorithms.adaptation import adapt
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


def adapted_outputs(model, params: dict, batch: Episode, spec: InnerSpec) -> torch.Tensor:
    """Query predictions of every task of `batch` after 0..spec.steps test-time steps: (T, S+1, *out).

    The same adaptation as `adapt_curve` (the evaluation's: head-only for ANIL, learned rates, the
    BatchNorm mode), with the query set standing for the inputs to predict on (a plot's grid)."""
    spec = spec.with_(track=True, keep_outputs=True, first_order=True, msl_weights=None)
    params = {k: v.detach() for k, v in params.items()}

    def outputs(p, xs, ys, xq, yq):
        return {"out": adapt(model, p, xs, ys, xq, yq, spec)[1]["out_steps"]}

    with torch.no_grad():
        return map_tasks(outputs, params, batch, spec)["out"]
