"""Bounded memory: checkpointed inner steps give the same meta-gradient (float64, 1e-9) with memory that
no longer grows with the steps; the peak-memory measurement sees PyTorch's allocations; bf16 autocast
keeps the meta-parameters and their gradients float32 within a stated tolerance of fp32's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metadist.algorithms import ALGORITHMS, make_spec
from metadist.config import ConfigError, from_dict
from metadist.episode import Episode
from metadist.models.conv4 import Conv4
from metadist.models.resnet12 import ResNet12
from metadist.runtime.memory import PeakMemory

from .test_algorithms import TIGHT, assert_grads_close, image_batch, meta_params, tiny_conv
from .test_resnet12 import params_of, resnet_cfg, tiny_resnet

pytestmark = pytest.mark.usefixtures("single_thread")

MB = 2 ** 20


def conv_cfg(*overrides: str):
    return from_dict({"task": {"family": "fewshot", "ways": 3, "shots": 2, "query": 2},
                      "model": {"name": "conv4", "filters": 4, "channels": 1, "image_size": 16},
                      "inner": {"lr": 0.1, "steps": 3}, "algorithm": {"task_parallel": "loop"}}, list(overrides))


def build(model_name: str, *overrides: str):
    if model_name == "conv4":
        cfg = conv_cfg(*overrides)
        model = tiny_conv(cfg)
        return cfg, model, meta_params(model, cfg)
    cfg = resnet_cfg("inner.steps=3", "algorithm.task_parallel=loop", *overrides)
    model = tiny_resnet(cfg)
    return cfg, model, params_of(model, cfg)


VARIANTS = {
    "maml": [],
    "maml++ msl lslr per-step bn": ["algorithm.msl=true", "algorithm.msl_anneal_steps=4", "algorithm.lslr=true",
                                     "model.bn=per_step", "model.bn_weights=per_step"],
    "metasgd": ["algorithm.name=metasgd"],
    "anil": ["algorithm.name=anil"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_name", ["conv4", "resnet12"])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(model_name, variant):
    cfg, model, params = build(model_name, *VARIANTS[variant])
    batch = image_batch(tasks=2)
    name = cfg.algorithm.name
    spec = make_spec(cfg, outer_step=1)
    assert not spec.first_order and not spec.checkpoint
    plain, plain_metrics = ALGORITHMS[name](model, params, batch, spec)
    ckpt_cfg, _, _ = build(model_name, *VARIANTS[variant], "inner.checkpoint=true")
    ckpt_spec = make_spec(ckpt_cfg, outer_step=1)
    assert ckpt_spec.checkpoint
    ckpt, ckpt_metrics = ALGORITHMS[name](model, params, batch, ckpt_spec)
    assert_grads_close(ckpt, plain, rtol=1e-9, atol=1e-12)
    assert ckpt_metrics.keys() == plain_metrics.keys()
    for k in plain_metrics:  # the same losses, accuracies and per-step BatchNorm statistics
        torch.testing.assert_close(ckpt_metrics[k], plain_metrics[k], **TIGHT)
    # Checkpointing needs plain autograd: asked for under vmap, the tasks still run one at a time, and
    # the result is vmap's (one summation order apart).
    vmapped, _ = ALGORITHMS[name](model, params, batch, ckpt_spec.with_(task_parallel="vmap"))
    assert_grads_close(vmapped, plain, rtol=1e-9, atol=1e-12)


def test_checkpointing_replays_drop_block_masks():
    cfg, model, params = build("resnet12", "model.drop_rate=0.3", "model.drop_block_size=2")
    batch = image_batch(tasks=2)
    spec = make_spec(cfg)
    assert spec.drop
    torch.manual_seed(5)
    plain, _ = ALGORITHMS["maml"](model, params, batch, spec)
    torch.manual_seed(5)
    ckpt, _ = ALGORITHMS["maml"](model, params, batch, spec.with_(checkpoint=True))
    assert_grads_close(ckpt, plain, rtol=1e-9, atol=1e-12)


def test_peak_memory_sees_allocations_and_frees():
    with PeakMemory("cpu") as mem:
        a = torch.empty(4 * MB, dtype=torch.uint8)
        b = torch.empty(2 * MB, dtype=torch.uint8)
        del a, b
        c = torch.empty(1 * MB, dtype=torch.uint8)
        view = c[:10]  # a view allocates nothing new
        del view
    assert mem.peak == 6 * MB
    before = torch.ones(8 * MB, dtype=torch.uint8)  # made before the block: not counted
    with PeakMemory("cpu") as mem:
        before.add_(1)  # in place: no new storage
        d = before * 2
    assert mem.peak == 8 * MB and torch.equal(d[:2], torch.tensor([4, 4], dtype=torch.uint8))


def _peak(model, params, batch, spec) -> int:
    with PeakMemory("cpu") as mem:
        ALGORITHMS["maml"](model, params, batch, spec)
    return mem.peak


def test_checkpointed_memory_does_not_grow_with_inner_steps():
    torch.manual_seed(0)
    ways, query = 5, 5
    model = Conv4(ways=ways, channels=3, filters=16, image_size=32, bn_steps=9)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = torch.arange(ways)
    batch = Episode(torch.rand(1, ways, 3, 32, 32), labels[None], torch.rand(1, ways * query, 3, 32, 32),
                    labels.repeat(query)[None])
    spec = make_spec(from_dict({"task": {"family": "fewshot", "ways": ways, "shots": 1, "query": query},
                                "model": {"name": "conv4", "filters": 16, "image_size": 32},
                                "algorithm": {"task_parallel": "loop"}})).with_(report_before=False)
    plain = {k: _peak(model, params, batch, spec.with_(steps=k)) for k in (2, 8)}
    ckpt = {k: _peak(model, params, batch, spec.with_(steps=k, checkpoint=True)) for k in (2, 8)}
    plain_growth, ckpt_growth = plain[8] - plain[2], ckpt[8] - ckpt[2]
    # Without checkpointing each step keeps its support activations and inner-gradient graph (2.0 MB
    # here); with it, a step keeps its input fast weights and nothing else (0.03 MB for this Conv-4).
    weights = sum(p.numel() * p.element_size() for p in params.values())
    assert plain_growth > 6 * 1.5 * MB, plain
    assert ckpt_growth <= 6 * weights * 1.01, (ckpt, weights)
    assert ckpt[8] < plain[8]


def test_checkpointing_under_vmap_is_one_config_error():
    with pytest.raises(ConfigError, match="inner.checkpoint: true recomputes .* allowed with algorithm.task_parallel vmap"):
        conv_cfg("inner.checkpoint=true", "algorithm.task_parallel=vmap")
    assert conv_cfg("inner.checkpoint=on").inner.checkpoint is True  # YAML's on/off are booleans
    with pytest.raises(ConfigError, match="inner.checkpoint"):
        conv_cfg("inner.checkpoint=sometimes")


# bf16 autocast against fp32 on the same weights and tasks: 5-way 1-shot, 3 query images per class at
# 32 px, 2 inner steps at 0.01, 2 tasks, initial weights. Bfloat16 keeps 8 bits of mantissa: even the plain
# first-order gradient of these initial BatchNorm networks is 0.14 (Conv-4) to 0.26 (ResNet-12) off
# fp32's in relative norm, as it is for the same network in standard modules under torch.autocast, and
# the second-order meta-gradient compounds it through the inner steps. The stated tolerance is on the
# meta-gradient's direction (cosine similarity to fp32's; measured 0.96 and 0.74) and the query loss after
# adaptation (relative; measured 0.1% and 1.4%).
BF16_TOLERANCE = {"conv4": {"cosine": 0.9, "loss": 0.01}, "resnet12": {"cosine": 0.6, "loss": 0.03}}


@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("model_name", ["conv4", "resnet12"])
def test_bf16_meta_gradient_is_within_the_stated_tolerance_of_fp32(model_name, mode):
    torch.manual_seed(0)
    ways, query, size = 5, 3, 32
    model = (Conv4(ways=ways, channels=3, filters=32, image_size=size, bn_steps=3) if model_name == "conv4"
             else ResNet12(ways=ways, channels=3, image_size=size, bn_steps=3))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = torch.arange(ways)
    batch = Episode(torch.rand(2, ways, 3, size, size), labels.expand(2, -1),
                    torch.rand(2, ways * query, 3, size, size), labels.repeat(query).expand(2, -1))
    spec = make_spec(from_dict({"task": {"family": "fewshot", "ways": ways, "shots": 1, "query": query},
                                "model": {"name": model_name, "image_size": size},
                                "inner": {"steps": 2, "lr": 0.01}, "algorithm": {"task_parallel": mode}}))
    fp32, m32 = ALGORITHMS["maml"](model, params, batch, spec)
    bf16, m16 = ALGORITHMS["maml"](model, params, batch, spec.with_(precision="bf16"))
    assert all(g.dtype == torch.float32 for g in bf16.values()) and m16["loss_after"].dtype == torch.float32
    a = torch.cat([fp32[k].flatten() for k in fp32])
    b = torch.cat([bf16[k].flatten() for k in fp32])
    tol = BF16_TOLERANCE[model_name]
    assert F.cosine_similarity(a, b, dim=0) > tol["cosine"]
    assert (m16["loss_after"] - m32["loss_after"]).abs() < tol["loss"] * m32["loss_after"]
    # bf16 is really in effect: far beyond fp32 rounding.
    assert (a - b).norm() > 1e-3 * a.norm()


def test_estimated_peak_extrapolates_the_per_step_growth():
    from metadist.runtime import memory
    assert memory.estimated_peak(100, 130, 10) == 100 + 9 * 30
    assert memory.estimated_peak(100, 90, 5) == 100  # no growth measured: no growth assumed
    assert memory.needs_checkpoint(100, 130, 10, free=int(370 / memory.HEADROOM) - 1)
    assert not memory.needs_checkpoint(100, 130, 10, free=int(370 / memory.HEADROOM) + 1)
    assert memory.free_bytes(torch.device("cpu")) > 0


@pytest.mark.parametrize("free, expected", [(1, True), (1 << 50, False)])
def test_checkpoint_auto_turns_on_when_the_measured_peak_does_not_fit(monkeypatch, tmp_path, free, expected):
    from metadist.runtime import memory
    from metadist.runtime.driver import Trainer

    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    measured = []
    real = memory.needs_checkpoint
    monkeypatch.setattr(memory, "needs_checkpoint", lambda *a: measured.append(a) or real(*a))
    cfg = from_dict({"task": {"family": "noise", "ways": 3, "shots": 1, "query": 2},
                     "model": {"name": "conv4", "filters": 4, "image_size": 16},
                     "inner": {"steps": 3, "checkpoint": "auto"}, "algorithm": {"task_parallel": "auto"},
                     "train": {"steps": 2, "meta_batch": 2, "out_dir": str(tmp_path), "log_every": 1},
                     "eval": {"episodes": 2, "steps": 1}, "tracking": {"enabled": False}})
    trainer = Trainer(cfg)
    try:
        trainer.start()
        # Peaks of one task at 1 and 2 steps, measured (growing), set against the free memory.
        (one, two, steps, given), = measured
        assert 0 < one < two and steps == 3 and given == free
        assert trainer.inner_checkpoint is expected
        if expected:
            assert trainer.task_parallel == "loop"
        trainer.train_step()
        assert trainer.state()["inner_checkpoint"] is expected
    finally:
        trainer.close()


def test_checkpoint_is_for_second_order_inner_loops_only():
    for algo in ("fomaml", "reptile", "pretrain"):
        with pytest.raises(ConfigError, match=f"inner.checkpoint: .*'{algo}' does not keep; allowed: false"):
            conv_cfg(f"algorithm.name={algo}", "inner.checkpoint=auto")
