"""ResNet-12: its structure against the standard-module network of bench/inner_loop.py, DropBlock, per-step BatchNorm
weights and biases (BNWB, which Conv-4 shares), and every algorithm through it in both task modes and
both BatchNorm modes, second order checked against the hand-written reference of test_algorithms."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metadist.algorithms import ALGORITHMS, init_meta_params, make_eval_spec, make_spec
from metadist.config import ConfigError, from_dict
from metadist.models import build_model
from metadist.models.norm import MetaBatchNorm2d
from metadist.models.resnet12 import ResNet12, drop_block

from ..conftest import ROOT
from .test_algorithms import TIGHT, assert_grads_close, image_batch, reference_grads

sys.path.insert(0, str(ROOT / "bench"))
from inner_loop import PeerResNet12  # noqa: E402  (the standard-module network the benchmark's peers use)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = [4, 6, 8, 10]


def resnet_cfg(*overrides: str):
    return from_dict({"task": {"family": "fewshot", "ways": 3, "shots": 2, "query": 2},
                      "model": {"name": "resnet12", "widths": SMALL, "channels": 1, "image_size": 16},
                      "inner": {"lr": 0.1, "steps": 2}, "algorithm": {"task_parallel": "vmap"}}, list(overrides))


def tiny_resnet(cfg, seed: int = 0) -> ResNet12:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(cfg).double()


def params_of(model, cfg):
    return {k: v.double() for k, v in init_meta_params(model, cfg).items()}


def test_default_resnet12_is_the_few_shot_backbone():
    m = ResNet12(ways=5)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(12.4e6, rel=0.01)
    widths = [b["conv3"].out_channels for b in m.body["blocks"]]
    assert widths == [64, 160, 320, 640] and m.feature_dim == 640
    assert all(n.startswith(("body.", "head.")) for n, _ in m.named_parameters())
    assert all(b[c].bias is None for b in m.body["blocks"] for c in ("conv1", "conv2", "conv3", "shortcut"))
    with pytest.raises(ValueError, match="four widths"):
        ResNet12(widths=(8, 8, 8))


@pytest.mark.parametrize("size", [32, 84])
def test_resnet12_equals_a_standard_module_network_with_the_same_weights(size):
    # The benchmark's peer network: nn.Conv2d, nn.BatchNorm2d in train mode, leaky ReLU, max-pooling.
    torch.manual_seed(0)
    ours = ResNet12(ways=5, channels=3, widths=SMALL, image_size=size).double()
    plain = PeerResNet12(SMALL, 3, 5).double().train()
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in n and n.endswith("weight") else 0.0))
        for n, p in plain.named_parameters():
            p.copy_(mine[n if n.startswith("head.") else f"body.{n}"])
    x = torch.randn(6, 3, size, size, dtype=torch.float64)
    torch.testing.assert_close(ours(x), plain(x))
    out, stats = ours(x, stats=True)
    assert len(stats) == 16 and [s[0].shape[0] for s in stats[:4]] == [4] * 4 and stats[-1][0].shape == (10,)
    torch.testing.assert_close(ours(ours(x, part="body"), part="head"), ours(x))


def test_drop_block_drops_squares_at_the_rate_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(64, 8, 10, 10)
    out = drop_block(x, rate=0.2, block=3)
    dropped = (out == 0).float().mean().item()
    assert 0.15 < dropped < 0.25
    torch.testing.assert_close(out.mean(), torch.tensor(1.0))
    # Dropped units come in whole blocks: a dropped unit's 3x3 square (inside the map) holds a whole
    # dropped block, so no dropped unit is isolated.
    zero = (out == 0).float()
    neighbours = F.conv2d(zero.view(-1, 1, 10, 10), torch.ones(1, 1, 3, 3), padding=1).view_as(zero)
    assert (neighbours[zero.bool()] >= 4).all()


def test_drop_block_runs_in_training_only_and_replays_under_the_seed():
    cfg = resnet_cfg("model.drop_rate=0.3", "model.drop_block_size=2", "model.widths=[4,6,8,10]",
                     "model.image_size=32")
    model = tiny_resnet(cfg)
    x = torch.randn(6, 1, 32, 32, dtype=torch.float64)
    params = dict(model.named_parameters())
    plain = functional_call(model, params, (x,))
    torch.manual_seed(1)
    a = functional_call(model, params, (x,), {"drop": True})
    torch.manual_seed(1)
    b = functional_call(model, params, (x,), {"drop": True})
    torch.manual_seed(2)
    c = functional_call(model, params, (x,), {"drop": True})
    assert torch.equal(a, b) and not torch.allclose(a, plain) and not torch.allclose(a, c)
    assert make_spec(cfg).drop and not make_eval_spec(cfg).drop
    # Under vmap each task draws its own masks, in both task modes from the same generator state.
    batch = image_batch(tasks=2)
    batch.xs, batch.xq = (t.repeat_interleave(2, -1).repeat_interleave(2, -2) for t in (batch.xs, batch.xq))
    p = params_of(model, cfg)
    torch.manual_seed(3)
    _, m1 = ALGORITHMS["maml"](model, p, batch, make_spec(cfg))
    torch.manual_seed(3)
    _, m2 = ALGORITHMS["maml"](model, p, batch, make_spec(cfg))
    _, m0 = ALGORITHMS["maml"](model, p, batch, make_spec(cfg).with_(drop=False))
    assert torch.equal(m1["loss_after"], m2["loss_after"]) and not torch.equal(m1["loss_after"], m0["loss_after"])


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_resnet12_maml_second_order_matches_reference(mode):
    cfg = resnet_cfg(f"algorithm.task_parallel={mode}")
    model, batch = tiny_resnet(cfg), image_batch()
    params = params_of(model, cfg)
    grads, metrics = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    expected = reference_grads(model, params, batch, steps=2, lr=0.1, loss="ce")
    assert_grads_close(grads, expected, rtol=1e-8, atol=1e-10)
    assert 0 <= metrics["acc_after"].item() <= 2


@pytest.mark.parametrize("weights", ["shared", "per_step"])
@pytest.mark.parametrize("bn", ["transductive", "per_step"])
@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "reptile", "pretrain"])
def test_resnet12_serves_every_algorithm_in_both_task_modes(name, bn, weights):
    grads = {}
    for mode in ("vmap", "loop"):
        cfg = resnet_cfg(f"model.bn={bn}", f"model.bn_weights={weights}", f"algorithm.name={name}",
                         f"algorithm.task_parallel={mode}")
        model, batch = tiny_resnet(cfg), image_batch(tasks=2)
        params = params_of(model, cfg)
        grads[mode], metrics = ALGORITHMS[name](model, params, batch, make_spec(cfg))
        assert all(torch.isfinite(g).all() for g in grads[mode].values())
        if bn == "per_step":
            # 16 BatchNorm layers of widths 4..10, padded to the widest; each reads back its own channels.
            assert metrics["bn_mean"].shape[1:] == (16, 10)
            before = [n.running_mean.clone() for n in model.modules() if isinstance(n, MetaBatchNorm2d)]
            model.update_running_stats(metrics["bn_mean"] / 2, metrics["bn_var"] / 2, momentum=1.0)
            norms = [n for n in model.modules() if isinstance(n, MetaBatchNorm2d)]
            assert all(n.running_mean.shape[1] == b.shape[1] for n, b in zip(norms, before))
            torch.testing.assert_close(norms[-1].running_mean[0], metrics["bn_mean"][0, -1] / 2)
    assert_grads_close(grads["vmap"], grads["loop"], **TIGHT)
    if name == "maml" and bn == "transductive" and weights == "shared":  # the reference calls step 0 only
        expected = reference_grads(model, params, batch, steps=2, lr=0.1, loss="ce")
        assert_grads_close(grads["vmap"], expected, rtol=1e-8, atol=1e-10)
    if name == "anil":
        # The body is meta-learned through the adapted head.
        assert grads["vmap"]["body.blocks.0.conv1.weight"].abs().max() > 0


@pytest.mark.parametrize("model_name", ["conv4", "resnet12"])
def test_per_step_bn_weights_give_each_step_its_own_affine_map(model_name):
    over = ["model.bn_weights=per_step", "inner.steps=2", "eval.steps=5"]
    cfg = resnet_cfg(*over) if model_name == "resnet12" else from_dict(
        {"task": {"family": "fewshot", "ways": 3, "shots": 2, "query": 2},
         "model": {"name": "conv4", "filters": 4, "channels": 1, "image_size": 16},
         "inner": {"lr": 0.1}, "algorithm": {"task_parallel": "vmap"}}, over)
    model = tiny_resnet(cfg)
    norms = [n for n in model.modules() if isinstance(n, MetaBatchNorm2d)]
    # A row per forward of training (steps 0, 1, 2); running statistics for every test step too.
    assert all(n.weight.shape[0] == 3 and n.bias.shape[0] == 3 and n.running_mean.shape[0] == 6 for n in norms)
    norm = norms[0]
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 4.0)[:, None].expand_as(norm.weight))
    x = torch.randn(4, norm.weight.shape[1], 5, 5, dtype=torch.float64)
    outs = [norm(x, step, "batch")[0] for step in (0, 1, 2, 7)]
    torch.testing.assert_close(outs[1], 2 * outs[0])
    torch.testing.assert_close(outs[3], outs[2])  # beyond the trained steps: the last row
    model, batch = tiny_resnet(cfg), image_batch()
    params = params_of(model, cfg)
    grads, _ = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    # Row k of each BatchNorm weight gets the gradient of the forwards at step k only: row 2 from the
    # query after the last step, rows 0 and 1 from the support passes (and, through them, the query).
    g = grads[[n for n in grads if n.endswith("weight") and "norm" in n][0]]
    assert g.shape[0] == 3 and all(g[k].abs().max() > 0 for k in range(3))
    shared = resnet_cfg("inner.steps=2") if model_name == "resnet12" else from_dict(
        {"task": {"family": "fewshot", "ways": 3, "shots": 2, "query": 2},
         "model": {"name": "conv4", "filters": 4, "channels": 1, "image_size": 16},
         "inner": {"lr": 0.1, "steps": 2}, "algorithm": {"task_parallel": "vmap"}})
    shared_model = tiny_resnet(shared)
    sp = params_of(shared_model, shared)
    # With the same weights in every row the per-step model computes the shared model's function as long
    # as the inner loop leaves BatchNorm alone (ANIL adapts the head only; under MAML each row takes its
    # own inner update), and then its rows' meta-gradients sum to the shared weight's.
    per_step = {n: (sp[n].expand_as(params[n]).clone() if params[n].dim() == sp[n].dim() + 1 else sp[n]) for n in params}
    g_rows, _ = ALGORITHMS["anil"](model, per_step, batch, make_spec(cfg))
    g_shared, _ = ALGORITHMS["anil"](shared_model, sp, batch, make_spec(shared))
    summed = {n: g_rows[n].sum(0) if g_rows[n].dim() == g_shared[n].dim() + 1 else g_rows[n] for n in g_rows}
    assert_grads_close(summed, g_shared, rtol=1e-8, atol=1e-11)


def test_resnet12_config_errors_are_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="model.widths: .*four widths"):
        resnet_cfg("model.widths=[4,6,8]")
    with pytest.raises(ConfigError, match="model.name: resnet12 is for fewshot"):
        from_dict({"model": {"name": "resnet12"}})
    with pytest.raises(ConfigError, match="model.bn_weights: 'per_step' is for the BatchNorm of conv4 and resnet12"):
        from_dict({"model": {"bn_weights": "per_step"}})
