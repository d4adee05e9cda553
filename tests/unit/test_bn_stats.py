"""per_step BatchNorm: every algorithm reports statistics, and they reach every running-stat row."""

from __future__ import annotations

import pytest
import torch

from metadist.algorithms import ALGORITHMS, InnerSpec
from metadist.episode import Episode
from metadist.models.conv4 import Conv4
from metadist.models.norm import MetaBatchNorm2d


def _setup(steps=2, tasks=3):
    torch.manual_seed(0)
    model = Conv4(ways=3, channels=1, filters=4, image_size=16, bn_steps=6)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    params_sgd = dict(params)
    params_sgd.update({f"lr/{n}": torch.full_like(p, 0.1) for n, p in params.items()})
    xs, xq = torch.randn(tasks, 3, 1, 16, 16), torch.randn(tasks, 6, 1, 16, 16)
    ys, yq = torch.arange(3).repeat(tasks, 1), torch.arange(3).repeat(tasks, 2)
    spec = InnerSpec(loss="ce", steps=steps, lr=0.1, bn="per_step", task_parallel="vmap")
    return model, params, params_sgd, Episode(xs, ys, xq, yq), spec


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_reports_per_step_statistics(name):
    model, params, params_sgd, batch, spec = _setup()
    _, metrics = ALGORITHMS[name](model, params_sgd if name == "metasgd" else params, batch, spec)
    rows = 1 if name == "pretrain" else spec.steps + 1
    assert metrics["bn_mean"].shape == (rows, 4, 4) and metrics["bn_var"].shape == (rows, 4, 4)
    # Row 0 of the first layer is the batch mean of the first conv's output, summed over tasks.
    first = torch.nn.functional.conv2d(batch.xs.flatten(0, 1), params["body.conv.0.weight"],
                                       params["body.conv.0.bias"], padding=1)
    x0 = first.view(3, 3, 4, 16, 16) if name != "pretrain" else torch.cat(
        [first.view(3, 3, 4, 16, 16), torch.nn.functional.conv2d(
            batch.xq.flatten(0, 1), params["body.conv.0.weight"], params["body.conv.0.bias"],
            padding=1).view(3, 6, 4, 16, 16)], dim=1)
    expected = x0.mean(dim=(1, 3, 4)).sum(0)
    torch.testing.assert_close(metrics["bn_mean"][0, 0], expected, rtol=1e-4, atol=1e-5)


def test_running_rows_past_the_trained_ones_take_the_last_trained_row():
    model = Conv4(ways=3, channels=1, filters=4, image_size=16, bn_steps=6)
    mean = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    var = torch.full((2, 4, 4), 3.0)
    model.update_running_stats(mean, var, momentum=1.0)
    norm = next(m for m in model.modules() if isinstance(m, MetaBatchNorm2d))
    assert torch.equal(norm.running_mean[0], mean[0, 0])
    assert all(torch.equal(norm.running_mean[k], mean[1, 0]) for k in range(1, 6))
    assert torch.equal(norm.running_var, torch.full((6, 4), 3.0))
    model.update_running_stats(mean * 0, var, momentum=0.5)  # momentum blends towards the new rows
    assert torch.equal(norm.running_mean[1], mean[1, 0] * 0.5)
