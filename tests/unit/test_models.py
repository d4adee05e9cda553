"""MLP and Conv-4: parameter naming, the body/head split, and Conv-4's functional BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metadist.config import from_dict
from metadist.models import MODELS, build_model, head_names
from metadist.models.conv4 import Conv4
from metadist.models.norm import MetaBatchNorm2d
from metadist.models.resnet12 import ResNet12
from metadist.models.mlp import MLP
from metadist.models.policy import GaussianPolicy

pytestmark = pytest.mark.usefixtures("single_thread")


def conv(seed=0, **kw) -> Conv4:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        args = dict(ways=3, channels=1, filters=4, image_size=16, bn_steps=3)
        args.update(kw)
        return Conv4(**args).double()


def images(n=6, size=16, channels=1, seed=0):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- MLP

def test_mlp_default_is_the_maml_sinusoid_network():
    m = MLP()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"body.0.weight": (40, 1), "body.0.bias": (40,), "body.2.weight": (40, 40),
                      "body.2.bias": (40,), "head.weight": (1, 40), "head.bias": (1,)}
    assert head_names(dict(m.named_parameters())) == ["head.weight", "head.bias"]
    assert all(isinstance(layer, (torch.nn.Linear, torch.nn.ReLU)) for layer in m.body)


def test_mlp_parts_compose_and_match_a_manual_forward():
    m = MLP(1, [5, 3], 2).double()
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)[:, None]
    p = dict(m.named_parameters())
    h = torch.relu(x @ p["body.0.weight"].T + p["body.0.bias"])
    h = torch.relu(h @ p["body.2.weight"].T + p["body.2.bias"])
    expected = h @ p["head.weight"].T + p["head.bias"]
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(m(x, part="body"), part="head"), expected)
    out, stats = m(x, stats=True)
    torch.testing.assert_close(out, expected)
    assert stats == []
    assert m(x, step=7, bn="running").shape == (11, 2)  # the shared signature; nothing to normalise


def test_build_model_mlp_from_config():
    m = build_model(from_dict({"model": {"hidden": [8, 6, 4], "in_features": 2, "out_features": 3}}))
    assert isinstance(m, MLP)
    assert m(torch.zeros(5, 2)).shape == (5, 3)
    assert [tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")] == [
        (8, 2), (6, 8), (4, 6), (3, 4)]


# ---------------------------------------------------------------------------------------------- Conv-4

def test_conv4_shapes_and_names():
    m = conv()
    assert m(images()).shape == (6, 3)
    assert m.feature_dim == 4  # 16 px after four 2x2 pools: 1x1 per filter
    assert all(n.startswith(("body.", "head.")) for n, _ in m.named_parameters())
    assert head_names(dict(m.named_parameters())) == ["head.weight", "head.bias"]
    big = Conv4(ways=5, channels=3, filters=2, image_size=84)
    assert big.feature_dim == 2 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5, as in the MAML paper
    assert big(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    with pytest.raises(ValueError, match="too small"):
        Conv4(image_size=8)


def test_conv4_with_stride_2_is_the_papers_omniglot_network():
    m = conv(filters=3, image_size=28, downsample="stride")
    assert m.feature_dim == 3 * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2, as TensorFlow's SAME stride-2 convolutions
    assert all(c.stride == (2, 2) for c in m.body["conv"])
    x, p = images(size=28), dict(m.named_parameters())
    h = x
    for i in range(4):  # conv stride 2, BatchNorm with the batch's statistics, ReLU; no pooling
        h = F.conv2d(h, p[f"body.conv.{i}.weight"], p[f"body.conv.{i}.bias"], stride=2, padding=1)
        h = F.batch_norm(h, None, None, p[f"body.norm.{i}.weight"], p[f"body.norm.{i}.bias"], training=True)
        h = torch.relu(h)
    torch.testing.assert_close(m(x), F.linear(h.flatten(1), p["head.weight"], p["head.bias"]))
    xs = images(n=12, size=28).view(2, 6, 1, 28, 28)
    batched = torch.func.vmap(lambda b: functional_call(m, p, (b,)))(xs)
    torch.testing.assert_close(batched, torch.stack([m(xs[0]), m(xs[1])]))
    cfg = from_dict({"task": {"family": "fewshot", "ways": 5}, "model": {"name": "conv4", "filters": 64,
                     "channels": 1, "image_size": 28, "downsample": "stride"}})
    assert build_model(cfg).feature_dim == 256
    with pytest.raises(ValueError, match="allowed: pool, stride"):
        Conv4(downsample="avg")


def test_conv4_parts_compose():
    m, x = conv(), images()
    feats = m(x, part="body")
    assert feats.shape == (6, m.feature_dim)
    torch.testing.assert_close(m(feats, part="head"), m(x))
    feats2, stats = m(x, part="body", stats=True)
    torch.testing.assert_close(feats2, feats)
    assert len(stats) == 4


def test_batch_norm_with_batch_statistics_matches_torch():
    bn = MetaBatchNorm2d(4, bn_steps=2).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    x = images(n=5, size=6, channels=4)
    out, (mean, var) = bn(x, step=0, bn="batch")
    ref = torch.nn.BatchNorm2d(4, eps=bn.eps).double().train()
    ref.load_state_dict({"weight": bn.weight, "bias": bn.bias}, strict=False)
    torch.testing.assert_close(out, ref(x))
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    assert not mean.requires_grad and not var.requires_grad
    # Normalising with the batch's own statistics never touches the running ones.
    assert torch.equal(bn.running_mean, torch.zeros(2, 4)) and torch.equal(bn.running_var, torch.ones(2, 4))


def test_batch_norm_with_running_statistics_uses_the_step_row():
    bn = MetaBatchNorm2d(3, bn_steps=3).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, 3, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(3, 3, generator=g))
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
    x = images(n=4, size=5, channels=3)
    for step, row in [(0, 0), (1, 1), (2, 2), (3, 2), (10, 2)]:  # beyond the kept steps: the last row
        out, stats = bn(x, step=step, bn="running")
        assert stats is None
        mean, var = bn.running_mean[row], bn.running_var[row]
        expected = ((x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
                    * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
        torch.testing.assert_close(out, expected)
    # Running statistics make each example's output independent of the rest of the batch.
    torch.testing.assert_close(bn(x[:1], 1, "running")[0], bn(x, 1, "running")[0][:1])
    assert not torch.allclose(bn(x[:2], 0, "batch")[0], bn(x, 0, "batch")[0][:2])


def test_conv4_statistics_and_functional_call():
    m, x = conv(), images()
    out, stats = m(x, stats=True)
    torch.testing.assert_close(out, m(x))
    first = m.body["conv"][0](x)
    torch.testing.assert_close(stats[0][0], first.mean((0, 2, 3)))
    torch.testing.assert_close(stats[0][1], first.var((0, 2, 3), unbiased=False))
    assert [tuple(s[0].shape) for s in stats] == [(4,)] * 4
    # functional_call with parameters only keeps the module's buffers (the running statistics).
    params = {n: p.detach() * 1.5 for n, p in m.named_parameters()}
    other = copy.deepcopy(m)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(params[n])
    torch.testing.assert_close(functional_call(m, params, (x,), {"step": 1, "bn": "running"}),
                               other(x, step=1, bn="running"))


def test_conv4_forward_is_vmappable():
    m = conv()
    params = dict(m.named_parameters())
    xs = images(n=12).view(2, 6, 1, 16, 16)
    batched = torch.func.vmap(lambda x: functional_call(m, params, (x,)))(xs)
    torch.testing.assert_close(batched, torch.stack([m(xs[0]), m(xs[1])]))


def test_build_model_conv4_keeps_running_statistics_for_every_step():
    cfg = from_dict({"task": {"family": "fewshot", "ways": 4},
                     "model": {"name": "conv4", "filters": 3, "channels": 1, "image_size": 28},
                     "inner": {"steps": 2}, "eval": {"steps": 6}})
    m = build_model(cfg)
    assert isinstance(m, Conv4) and m.head.out_features == 4 and m.body["conv"][0].in_channels == 1
    norms = [mod for mod in m.modules() if isinstance(mod, MetaBatchNorm2d)]
    assert len(norms) == 4 and all(n.running_mean.shape == (7, 3) for n in norms)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 4)


def test_model_registry_is_keyed_by_config_names():
    assert set(MODELS) == {"mlp", "conv4", "resnet12", "policy"}
    assert type(MODELS["mlp"](from_dict({}))) is MLP
    nav = from_dict({"task": {"family": "navigation"}, "model": {"name": "policy", "hidden": [7], "init_std": 0.5}})
    policy = MODELS["policy"](nav)
    assert type(policy) is GaussianPolicy and policy.body[0].out_features == 7
    assert torch.allclose(policy.head.log_std.exp(), torch.tensor([0.5, 0.5]))
    cfg = from_dict({"task": {"family": "noise", "ways": 3}, "model": {"name": "conv4", "image_size": 16}})
    assert type(MODELS["conv4"](cfg)) is Conv4
    cfg = from_dict({"task": {"family": "noise", "ways": 3}, "model": {"name": "resnet12", "image_size": 16}})
    assert type(MODELS["resnet12"](cfg)) is ResNet12
