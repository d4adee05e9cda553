"""The algorithms against hand-written autograd references and finite differences, in float64.

Every reference here is written independently of metadist.algorithms: a plain loop over tasks and inner
steps with `torch.autograd.grad(..., create_graph=True)` (or torch.optim for Reptile and the adaptation
curves), calling the model with an ordinary full forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metadist.algorithms import (ALGORITHMS, adapt_curve, init_meta_params, make_eval_spec, make_spec,
                                 msl_weights)
from metadist.algorithms.adaptation import adapt
from metadist.algorithms.spec import InnerSpec, minibatch_order
from metadist.config import ConfigError, from_dict
from metadist.models import build_model
from metadist.models.mlp import MLP
from metadist.episode import Episode
from metadist.tasks.sinusoid import SinusoidTasks

TIGHT = dict(rtol=1e-9, atol=1e-11)  # two exact computations of one float64 quantity
FD = dict(rtol=1e-5, atol=1e-6)  # central differences, eps=1e-6, float64

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------- helpers

# The runtime resolves `auto` before specs are made; these call the algorithms directly, so pin the mode.
def sine_cfg(*overrides: str):
    return from_dict({"model": {"hidden": [4, 4]}, "inner": {"lr": 0.02, "steps": 1},
                      "algorithm": {"task_parallel": "vmap"}}, list(overrides))


def conv_cfg(*overrides: str):
    return from_dict({"task": {"family": "fewshot", "ways": 3, "shots": 2, "query": 2},
                      "model": {"name": "conv4", "filters": 4, "channels": 1, "image_size": 16},
                      "inner": {"lr": 0.1, "steps": 1}, "algorithm": {"task_parallel": "vmap"}}, list(overrides))


def tiny_mlp(seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(1, [4, 4], 1).double()


def tiny_conv(cfg, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(cfg).double()


def meta_params(model, cfg) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in init_meta_params(model, cfg).items()}


def sine_batch(tasks: int = 4, shots: int = 5, query: int = 7, step: int = 0) -> Episode:
    ep = SinusoidTasks(seed=0).sample(step, range(tasks), shots, query)
    return Episode(*(t.double() for t in ep.tensors()))


def image_batch(tasks: int = 2, ways: int = 3, shots: int = 2, query: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(tasks, ways * shots, 1, 16, 16, generator=g, dtype=torch.float64)
    xq = torch.randn(tasks, ways * query, 1, 16, 16, generator=g, dtype=torch.float64)
    ys = torch.arange(ways).repeat(shots).expand(tasks, -1).clone()
    yq = torch.arange(ways).repeat(query).expand(tasks, -1).clone()
    return Episode(xs, ys, xq, yq)


def loss_fn(kind: str):
    return F.mse_loss if kind == "mse" else F.cross_entropy


def rate(leaves, name: str, k: int, lr: float):
    if f"lr/{name}" in leaves:
        return leaves[f"lr/{name}"]
    if f"lslr/{name}" in leaves:
        return leaves[f"lslr/{name}"][k]
    return lr


def reference_grads(model, params, batch, *, steps, lr, first_order=False, head_only=False, msl=None,
                    loss="mse"):
    """d/dparams of sum_t meta-objective_t, by a plain autograd loop over tasks and inner steps."""
    lf = loss_fn(loss)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    net = {k: v for k, v in leaves.items() if "/" not in k}
    adapted = [n for n in net if n.startswith("head.")] if head_only else list(net)
    total = 0.0
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = (x[t] for x in batch.tensors())
        fast = dict(net)
        query_losses = []
        for k in range(steps):
            support = lf(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(support, [fast[n] for n in adapted], create_graph=not first_order)
            fast = {**fast, **{n: fast[n] - rate(leaves, n, k, lr) * g for n, g in zip(adapted, grads)}}
            query_losses.append(lf(functional_call(model, fast, (xq,)), yq))
        if msl is None:
            total = total + query_losses[-1]
        else:
            total = total + sum(w * q for w, q in zip(msl, query_losses))
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(leaves, grads)}


def post_adaptation_loss(model, params, batch, *, steps, lr) -> float:
    """Sum over tasks of the query loss after `steps` plain SGD steps, run from scratch (no graph kept)."""
    total = 0.0
    for t in range(batch.num_tasks):
        xs, ys, xq, yq = (x[t] for x in batch.tensors())
        fast = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if "/" not in k}
        for k in range(steps):
            grads = torch.autograd.grad(F.mse_loss(functional_call(model, fast, (xs,)), ys),
                                        list(fast.values()))
            fast = {n: (v - rate(params, n, k, lr) * g).detach().requires_grad_(True)
                    for (n, v), g in zip(fast.items(), grads)}
        with torch.no_grad():
            total += F.mse_loss(functional_call(model, fast, (xq,)), yq).item()
    return total


def finite_differences(f, params, keys, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        g = torch.zeros_like(params[key])
        for i in range(g.numel()):
            plus = {k: v.clone() for k, v in params.items()}
            minus = {k: v.clone() for k, v in params.items()}
            plus[key].view(-1)[i] += eps
            minus[key].view(-1)[i] -= eps
            g.view(-1)[i] = (f(plus) - f(minus)) / (2 * eps)
        out[key] = g
    return out


def assert_grads_close(actual, expected, **tol):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


def scale(g) -> float:
    return max(v.abs().max().item() for v in g.values())


# ------------------------------------------------------------------------------- MAML and FOMAML

@pytest.mark.parametrize("steps", [1, 2])
def test_maml_matches_central_finite_differences(steps):
    cfg = sine_cfg(f"inner.steps={steps}")
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    grads, _ = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    fd = finite_differences(lambda p: post_adaptation_loss(model, p, batch, steps=steps, lr=0.02),
                            params, list(params))
    assert_grads_close(grads, fd, **FD)
    # The check is sharp enough to see the Hessian terms: first-order MAML fails it.
    fo, _ = ALGORITHMS["fomaml"](model, params, batch, make_spec(cfg))
    assert max_diff(fo, fd) > 100 * (FD["atol"] + FD["rtol"] * scale(fd))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_matches_autograd_reference(steps, mode):
    cfg = sine_cfg(f"inner.steps={steps}", f"algorithm.task_parallel={mode}")
    model, batch = tiny_mlp(), sine_batch(4)
    params = meta_params(model, cfg)
    grads, metrics = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    assert_grads_close(grads, reference_grads(model, params, batch, steps=steps, lr=0.02), **TIGHT)
    assert metrics["tasks"].item() == 4


@pytest.mark.parametrize("steps", [1, 2])
def test_fomaml_matches_detached_reference_and_differs_from_maml(steps):
    cfg = sine_cfg(f"inner.steps={steps}", "algorithm.name=fomaml")
    spec = make_spec(cfg)
    assert spec.first_order
    model, batch = tiny_mlp(), sine_batch(4)
    params = meta_params(model, cfg)
    fo, _ = ALGORITHMS["fomaml"](model, params, batch, spec)
    assert_grads_close(fo, reference_grads(model, params, batch, steps=steps, lr=0.02, first_order=True),
                       **TIGHT)
    # fomaml is first order even when handed a second-order spec.
    fo2, _ = ALGORITHMS["fomaml"](model, params, batch, spec.with_(first_order=False))
    assert_grads_close(fo2, fo, **TIGHT)
    second, _ = ALGORITHMS["maml"](model, params, batch, spec.with_(first_order=False))
    assert max_diff(fo, second) > 1e-3 * scale(second)


def test_metrics_are_the_query_losses_before_and_after_adaptation():
    cfg = sine_cfg("inner.steps=2")
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    _, metrics = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    before = sum(F.mse_loss(functional_call(model, params, (batch.xq[t],)), batch.yq[t])
                 for t in range(3))
    after = post_adaptation_loss(model, params, batch, steps=2, lr=0.02)
    torch.testing.assert_close(metrics["loss_before"], before.detach(), **TIGHT)
    torch.testing.assert_close(metrics["loss_after"].item(), after, **TIGHT)
    assert metrics["diverged"].item() == 0


def test_algorithms_are_pure():
    cfg = sine_cfg("inner.steps=2")
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    kept = {k: v.clone() for k, v in params.items()}
    state = copy.deepcopy(model.state_dict())
    a, _ = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    b, _ = ALGORITHMS["maml"](model, params, batch, make_spec(cfg))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(params[k], kept[k]) for k in kept)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------- Reptile

def _reptile_reference(model, params, batch, steps, lr, optimizer):
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):
        net = copy.deepcopy(model)
        net.load_state_dict(params)
        if optimizer == "adam":
            opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        else:
            opt = torch.optim.SGD(net.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(net(batch.xs[t]), batch.ys[t]).backward()
            opt.step()
        for k, w in net.named_parameters():
            total[k] += params[k] - w.detach()
    return total


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_matches_k_optimizer_steps_per_task(optimizer, mode):
    cfg = sine_cfg("algorithm.name=reptile", "inner.steps=3", f"algorithm.reptile_optimizer={optimizer}",
                   f"algorithm.task_parallel={mode}")
    model, batch = tiny_mlp(), sine_batch(4)
    params = meta_params(model, cfg)
    grads, metrics = ALGORITHMS["reptile"](model, params, batch, make_spec(cfg))
    expected = _reptile_reference(model, params, batch, 3, 0.02, optimizer)
    assert_grads_close(grads, expected, rtol=1e-9, atol=1e-12)
    assert scale(grads) > 1e-3
    assert metrics["tasks"].item() == 4
    before = sum(F.mse_loss(functional_call(model, params, (batch.xq[t],)), batch.yq[t]) for t in range(4))
    torch.testing.assert_close(metrics["loss_before"], before, **TIGHT)
    # With theta - W summed over tasks, an outer SGD step of size eps on the mean is Reptile's update.
    eps = 0.5
    w_mean = {k: params[k] - expected[k] / 4 for k in params}
    for k in params:
        torch.testing.assert_close(params[k] - eps * grads[k] / 4, params[k] + eps * (w_mean[k] - params[k]),
                                   **TIGHT)


def test_reptile_adam_differs_from_sgd():
    model, batch = tiny_mlp(), sine_batch(2)
    out = {}
    for opt in ("sgd", "adam"):
        cfg = sine_cfg("algorithm.name=reptile", "inner.steps=2", f"algorithm.reptile_optimizer={opt}")
        out[opt], _ = ALGORITHMS["reptile"](model, meta_params(model, cfg), batch, make_spec(cfg))
    assert max_diff(out["sgd"], out["adam"]) > 1e-3


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_evaluates_with_its_inner_optimizer(optimizer, mode):
    # The Reptile code adapts its test tasks with the training inner optimizer (Adam, beta1 0): the
    # evaluation curve must be that of torch.optim's steps on the support set, fresh per task.
    cfg = sine_cfg("algorithm.name=reptile", f"algorithm.reptile_optimizer={optimizer}", "eval.steps=4",
                   "eval.lr=0.05", f"algorithm.task_parallel={mode}")
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    curve = adapt_curve(model, params, batch, make_eval_spec(cfg))["loss"]
    for t in range(batch.num_tasks):
        net = copy.deepcopy(model)
        net.load_state_dict(params)
        opt = (torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.0, 0.999), eps=1e-8) if optimizer == "adam"
               else torch.optim.SGD(net.parameters(), lr=0.05))
        expected = []
        for _ in range(4):
            expected.append(F.mse_loss(net(batch.xq[t]), batch.yq[t]).detach())
            opt.zero_grad()
            F.mse_loss(net(batch.xs[t]), batch.ys[t]).backward()
            opt.step()
        expected.append(F.mse_loss(net(batch.xq[t]), batch.yq[t]).detach())
        torch.testing.assert_close(curve[t], torch.stack(expected), **TIGHT)


def test_minibatch_order_is_the_reptile_codes_draw_without_replacement():
    order = minibatch_order(10, 4, 6, seed=3)
    assert len(order) == 6 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    # 24 draws: two whole passes over the 10 examples, each a permutation, then 4 of a third.
    assert sorted(flat[:10]) == sorted(flat[10:20]) == list(range(10)) and len(set(flat[20:])) == 4
    assert order == minibatch_order(10, 4, 6, seed=3) and order != minibatch_order(10, 4, 6, seed=4)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_reptile_with_inner_batches_matches_adam_steps_on_those_batches(mode):
    # The Reptile code's inner loop: each Adam step on the next mini-batch of the support set; and its
    # test tasks adapted the same way (eval.inner_batch).
    cfg = sine_cfg("algorithm.name=reptile", "inner.steps=4", "algorithm.reptile_optimizer=adam", "task.shots=6",
                   "inner.batch=4", "eval.inner_batch=3", "eval.steps=3", "eval.lr=0.05",
                   f"algorithm.task_parallel={mode}")
    model, batch = tiny_mlp(), sine_batch(3, shots=6)
    params = meta_params(model, cfg)
    spec, eval_spec = make_spec(cfg, outer_step=7), make_eval_spec(cfg)
    assert spec.batches == minibatch_order(6, 4, 4, seed=7) and len(eval_spec.batches) == 3
    grads, _ = ALGORITHMS["reptile"](model, params, batch, spec)
    curve = adapt_curve(model, params, batch, eval_spec)["loss"]
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):
        for batches, lr, out in ((spec.batches, 0.02, "grad"), (eval_spec.batches, 0.05, "curve")):
            net = copy.deepcopy(model)
            net.load_state_dict(params)
            opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
            for idx in batches:
                opt.zero_grad()
                F.mse_loss(net(batch.xs[t][list(idx)]), batch.ys[t][list(idx)]).backward()
                opt.step()
            if out == "grad":
                for k, w in net.named_parameters():
                    total[k] += params[k] - w.detach()
            else:
                torch.testing.assert_close(curve[t, -1], F.mse_loss(net(batch.xq[t]), batch.yq[t]).detach(), **TIGHT)
    assert_grads_close(grads, total, rtol=1e-9, atol=1e-12)
    whole, _ = ALGORITHMS["reptile"](model, params, batch, make_spec(sine_cfg(
        "algorithm.name=reptile", "inner.steps=4", "algorithm.reptile_optimizer=adam", "task.shots=6")))
    assert max_diff(grads, whole) > 1e-6  # the batches matter


def test_image_inner_batches_agree_between_task_modes():
    # Conv-4 with transductive BatchNorm over each mini-batch: vmap and the loop take the same batches.
    out = {}
    for mode in ("vmap", "loop"):
        cfg = conv_cfg("algorithm.name=reptile", "inner.steps=3", "inner.batch=4", f"algorithm.task_parallel={mode}")
        model = tiny_conv(cfg)
        out[mode], _ = ALGORITHMS["reptile"](model, meta_params(model, cfg), image_batch(), make_spec(cfg))
    assert_grads_close(out["vmap"], out["loop"], rtol=1e-9, atol=1e-12)
    assert scale(out["vmap"]) > 1e-6


def test_inner_batches_beyond_the_support_set_are_one_config_error():
    with pytest.raises(ConfigError, match=r"inner.batch: 11 is more than the support set \(10 examples\); allowed: 0 to 10"):
        sine_cfg("inner.batch=11")
    with pytest.raises(ConfigError, match=r"eval.inner_batch: 6 is more than the support set \(5 examples\)"):
        sine_cfg("eval.inner_batch=6", "eval.shots=5")
    with pytest.raises(ConfigError, match=r"inner.batch: 7 is more than the support set \(6 examples"):
        conv_cfg("inner.batch=7")  # 3 ways x 2 shots
    with pytest.raises(ConfigError, match="inner.batch: pretrain has no inner loop"):
        sine_cfg("inner.batch=5", "algorithm.name=pretrain")


def test_reptile_optimizer_applies_to_reptile_only():
    # The key is Reptile's: MAML's inner loop (training and test time) stays gradient descent.
    cfg = sine_cfg("algorithm.reptile_optimizer=adam")
    assert make_spec(cfg).inner_optimizer == "sgd" and make_eval_spec(cfg).inner_optimizer == "sgd"
    model, batch = tiny_mlp(), sine_batch(2)
    params = meta_params(model, cfg)
    plain = ALGORITHMS["maml"](model, params, batch, make_spec(sine_cfg()))[0]
    assert_grads_close(ALGORITHMS["maml"](model, params, batch, make_spec(cfg))[0], plain, **TIGHT)


# ----------------------------------------------------------------------------------------------- ANIL

@pytest.mark.parametrize("steps", [1, 2])
def test_anil_adapts_only_the_head_but_meta_learns_the_body(steps):
    cfg = sine_cfg("algorithm.name=anil", f"inner.steps={steps}")
    spec = make_spec(cfg)
    assert spec.adapt == "head"
    model, batch = tiny_mlp(), sine_batch(4)
    params = meta_params(model, cfg)
    grads, _ = ALGORITHMS["anil"](model, params, batch, spec)
    head_only = reference_grads(model, params, batch, steps=steps, lr=0.02, head_only=True)
    # Matching a reference that keeps the body at theta inside the task, and not one that adapts it,
    # shows the inner loop moved the head alone.
    assert_grads_close(grads, head_only, **TIGHT)
    everything = reference_grads(model, params, batch, steps=steps, lr=0.02)
    assert max_diff(grads, everything) > 1e-3 * scale(everything)
    body = [k for k in grads if k.startswith("body.")]
    assert body and all(grads[k].abs().sum() > 1e-6 for k in body)
    # anil adapts the head alone even when handed a spec that adapts everything.
    forced, _ = ALGORITHMS["anil"](model, params, batch, spec.with_(adapt="all"))
    assert_grads_close(forced, grads, **TIGHT)


def test_anil_objective_is_the_query_loss_with_the_body_at_theta():
    cfg = sine_cfg("algorithm.name=anil", "inner.steps=2")
    model, batch = tiny_mlp(), sine_batch(1)
    params = meta_params(model, cfg)
    xs, ys, xq, yq = (x[0] for x in batch.tensors())
    objective, _ = adapt(model, params, xs, ys, xq, yq, make_spec(cfg))
    head = {k: v.clone() for k, v in params.items() if k.startswith("head.")}
    opt_net = copy.deepcopy(model)
    opt_net.load_state_dict(params)
    opt = torch.optim.SGD(opt_net.head.parameters(), lr=0.02)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(opt_net(xs), ys).backward()
        opt.step()
    for k, v in opt_net.body.named_parameters():
        assert torch.equal(v.detach(), params[f"body.{k}"])
    assert any(not torch.equal(v.detach(), head[f"head.{k}"]) for k, v in opt_net.head.named_parameters())
    torch.testing.assert_close(objective, F.mse_loss(opt_net(xq), yq).detach(), **TIGHT)


# -------------------------------------------------------------------------------------------- Meta-SGD

def test_metasgd_learning_rates_get_correct_gradients():
    cfg = sine_cfg("algorithm.name=metasgd", "inner.steps=2")
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    net = [k for k in params if "/" not in k]
    assert sorted(k for k in params if "/" in k) == sorted(f"lr/{k}" for k in net)
    for k in net:
        assert params[f"lr/{k}"].shape == params[k].shape
        assert torch.all(params[f"lr/{k}"] == 0.02)
    # Distinct rates per element, so a wrong indexing of them would show.
    g = torch.Generator().manual_seed(1)
    params.update({f"lr/{k}": 0.01 + 0.02 * torch.rand(params[k].shape, generator=g, dtype=torch.float64)
                   for k in net})
    grads, _ = ALGORITHMS["metasgd"](model, params, batch, make_spec(cfg))
    assert_grads_close(grads, reference_grads(model, params, batch, steps=2, lr=None), **TIGHT)
    for k in net:
        assert grads[f"lr/{k}"].abs().sum() > 1e-6, k
    fd = finite_differences(lambda p: post_adaptation_loss(model, p, batch, steps=2, lr=None), params,
                            [f"lr/{k}" for k in net] + ["head.weight", "body.0.weight"])
    assert_grads_close({k: grads[k] for k in fd}, fd, **FD)


def test_metasgd_requires_learned_rates():
    cfg = sine_cfg("algorithm.name=metasgd")
    model = tiny_mlp()
    params = meta_params(model, sine_cfg())  # plain MAML parameters: no lr/*
    with pytest.raises(ValueError, match="lr/"):
        ALGORITHMS["metasgd"](model, params, sine_batch(2), make_spec(cfg))


# ----------------------------------------------------------------------------------------- pretraining

def test_pretrain_is_the_gradient_of_the_joint_loss():
    cfg = sine_cfg("algorithm.name=pretrain")
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    grads, _ = ALGORITHMS["pretrain"](model, params, batch, make_spec(cfg))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    total = sum(F.mse_loss(functional_call(model, leaves, (torch.cat([batch.xs[t], batch.xq[t]]),)),
                           torch.cat([batch.ys[t], batch.yq[t]])) for t in range(3))
    expected = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))
    assert_grads_close(grads, expected, **TIGHT)


# ------------------------------------------------------------------ splitting a batch across workers

def _params_for(model, name, steps=2):
    cfg = sine_cfg(f"algorithm.name={name}", f"inner.steps={steps}")
    return cfg, meta_params(model, cfg)


@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_halves_of_a_batch_sum_to_the_whole(name, mode, chunk):
    cfg = sine_cfg(f"algorithm.name={name}", "inner.steps=2", f"algorithm.task_parallel={mode}",
                   f"algorithm.chunk={chunk}")
    model, batch = tiny_mlp(), sine_batch(6)
    params, spec, algo = meta_params(model, cfg), make_spec(cfg), ALGORITHMS[name]
    whole_g, whole_m = algo(model, params, batch, spec)
    a_g, a_m = algo(model, params, batch.slice(0, 3), spec)
    b_g, b_m = algo(model, params, batch.slice(3, 6), spec)
    assert scale(whole_g) > 1e-6
    assert_grads_close({k: a_g[k] + b_g[k] for k in a_g}, whole_g, **TIGHT)
    assert whole_m.keys() == a_m.keys()
    for k in whole_m:
        torch.testing.assert_close(a_m[k] + b_m[k], whole_m[k], **TIGHT)
    assert whole_m["tasks"].item() == 6


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_vmap_loop_and_chunks_agree(name):
    model, batch = tiny_mlp(), sine_batch(5)
    cfg, params = _params_for(model, name)
    spec = make_spec(cfg)
    base, _ = ALGORITHMS[name](model, params, batch, spec.with_(task_parallel="loop"))
    for variant in (spec.with_(task_parallel="vmap"), spec.with_(task_parallel="vmap", chunk=2)):
        got, _ = ALGORITHMS[name](model, params, batch, variant)
        assert_grads_close(got, base, **TIGHT)


# ---------------------------------------------------------------------------------------------- MAML++

def test_msl_weights_sum_to_one_and_anneal_towards_the_last_step():
    assert msl_weights(1, 0, 100) == (1.0,)
    for steps in (2, 3, 5):
        w0 = msl_weights(steps, 0, 100)
        assert w0 == pytest.approx((1.0 / steps,) * steps)
        previous = w0
        for outer in (10, 50, 97, 99, 100, 1000):
            w = msl_weights(steps, outer, 100)
            assert len(w) == steps and sum(w) == pytest.approx(1.0, abs=1e-12)
            assert all(x > 0 for x in w)
            assert w[-1] >= previous[-1] and all(a <= b for a, b in zip(w[:-1], previous[:-1]))
            previous = w
        end = msl_weights(steps, 100, 100)
        assert end[:-1] == pytest.approx((0.03 / steps,) * (steps - 1))
        assert end[-1] == pytest.approx(1 - (steps - 1) * 0.03 / steps)
        assert msl_weights(steps, 10**6, 100) == end
    assert msl_weights(3, 50, 100) == pytest.approx((1 / 6, 1 / 6, 2 / 3))


def test_msl_objective_is_the_weighted_sum_of_per_step_query_losses():
    cfg = sine_cfg("algorithm.msl=true", "algorithm.msl_anneal_steps=100", "inner.steps=3")
    spec = make_spec(cfg, outer_step=40)
    weights = msl_weights(3, 40, 100)
    assert spec.msl_weights == weights and len(set(weights)) == 2
    assert make_spec(sine_cfg("inner.steps=3")).msl_weights is None
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    xs, ys, xq, yq = (x[0] for x in batch.tensors())
    objective, aux = adapt(model, params, xs, ys, xq, yq, spec.with_(track=True))
    torch.testing.assert_close(objective.detach(),
                               sum(w * l for w, l in zip(weights, aux["loss_steps"][1:])), **TIGHT)
    grads, _ = ALGORITHMS["maml"](model, params, batch, spec)
    assert_grads_close(grads, reference_grads(model, params, batch, steps=3, lr=0.02, msl=weights), **TIGHT)
    final_only = reference_grads(model, params, batch, steps=3, lr=0.02)
    assert max_diff(grads, final_only) > 1e-3 * scale(final_only)


@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_lslr_rates_are_learned_per_layer_and_step(name):
    cfg = sine_cfg(f"algorithm.name={name}", "algorithm.lslr=true", "inner.steps=2")
    model, batch = tiny_mlp(), sine_batch(3)
    raw = init_meta_params(model, cfg)
    net = [k for k in raw if "/" not in k]
    assert sorted(k for k in raw if "/" in k) == sorted(f"lslr/{k}" for k in net)
    for k in net:
        assert raw[f"lslr/{k}"].shape == (2,) and torch.all(raw[f"lslr/{k}"] == 0.02)
        assert raw[f"lslr/{k}"].dtype == raw[k].dtype
    params = meta_params(model, cfg)
    spec = make_spec(cfg)
    grads, _ = ALGORITHMS[name](model, params, batch, spec)
    # Rates equal to inner.lr: the network's gradient is plain (FO)MAML's.
    plain, _ = ALGORITHMS[name](model, meta_params(model, sine_cfg("inner.steps=2")), batch, spec)
    assert_grads_close({k: grads[k] for k in net}, plain, **TIGHT)
    for k in net:
        assert torch.all(grads[f"lslr/{k}"].abs() > 1e-8), k
    # Distinct rates per layer and step: each must be used at its own step.
    g = torch.Generator().manual_seed(2)
    params.update({f"lslr/{k}": 0.01 + 0.02 * torch.rand(2, generator=g, dtype=torch.float64) for k in net})
    grads, _ = ALGORITHMS[name](model, params, batch, spec)
    expected = reference_grads(model, params, batch, steps=2, lr=None, first_order=spec.first_order)
    assert_grads_close(grads, expected, **TIGHT)


def test_lslr_is_only_added_for_maml_and_fomaml():
    model = tiny_mlp()
    for name in ("reptile", "anil", "pretrain"):
        params = init_meta_params(model, sine_cfg(f"algorithm.name={name}", "algorithm.lslr=true"))
        assert all("/" not in k for k in params), name


def test_derivative_order_annealing():
    cfg = sine_cfg("algorithm.first_order_until=5", "inner.steps=2")
    assert [make_spec(cfg, s).first_order for s in (0, 4, 5, 6, 100)] == [True, True, False, False, False]
    assert not make_spec(sine_cfg(), 0).first_order
    assert all(make_spec(sine_cfg("algorithm.name=fomaml"), s).first_order for s in (0, 10**6))
    model, batch = tiny_mlp(), sine_batch(3)
    params = meta_params(model, cfg)
    early, _ = ALGORITHMS["maml"](model, params, batch, make_spec(cfg, 4))
    late, _ = ALGORITHMS["maml"](model, params, batch, make_spec(cfg, 5))
    assert_grads_close(early, reference_grads(model, params, batch, steps=2, lr=0.02, first_order=True),
                       **TIGHT)
    assert_grads_close(late, reference_grads(model, params, batch, steps=2, lr=0.02), **TIGHT)
    assert max_diff(early, late) > 1e-3 * scale(late)


# ---------------------------------------------------------------------------------------------- Conv-4

@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 2])
def test_conv4_maml_second_order_matches_reference(steps, mode):
    cfg = conv_cfg(f"inner.steps={steps}", f"algorithm.task_parallel={mode}")
    model, batch = tiny_conv(cfg), image_batch()
    params = meta_params(model, cfg)
    spec = make_spec(cfg)
    assert spec.loss == "ce" and not spec.first_order
    grads, metrics = ALGORITHMS["maml"](model, params, batch, spec)
    expected = reference_grads(model, params, batch, steps=steps, lr=0.1, loss="ce")
    assert_grads_close(grads, expected, rtol=1e-8, atol=1e-10)
    fo = reference_grads(model, params, batch, steps=steps, lr=0.1, loss="ce", first_order=True)
    assert max_diff(grads, fo) > 1e-4 * scale(fo)
    assert 0 <= metrics["acc_after"].item() <= 2 and "bn_mean" not in metrics


@pytest.mark.parametrize("bn", ["transductive", "per_step"])
@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "reptile", "pretrain"])
def test_conv4_with_stride_2_serves_every_algorithm_in_both_task_modes(name, bn):
    # The paper's Omniglot network (`model.downsample: stride`): no pooling, the convolutions halve.
    grads = {}
    for mode in ("vmap", "loop"):
        cfg = conv_cfg("model.downsample=stride", f"model.bn={bn}", f"algorithm.name={name}", "inner.steps=2",
                       f"algorithm.task_parallel={mode}")
        model, batch = tiny_conv(cfg), image_batch(tasks=2)
        assert model.feature_dim == 4 and not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
        params = meta_params(model, cfg)
        grads[mode], metrics = ALGORITHMS[name](model, params, batch, make_spec(cfg))
        assert all(torch.isfinite(g).all() for g in grads[mode].values())
        assert ("bn_mean" in metrics) == (bn == "per_step")  # per-step statistics, collected whatever the algorithm
    assert_grads_close(grads["vmap"], grads["loop"], **TIGHT)
    if name == "maml":
        expected = reference_grads(model, params, batch, steps=2, lr=0.1, loss="ce")
        assert_grads_close(grads["vmap"], expected, rtol=1e-8, atol=1e-10)


def test_conv4_per_step_training_returns_batch_statistics():
    steps = 2
    trans_cfg = conv_cfg(f"inner.steps={steps}")
    cfg = conv_cfg(f"inner.steps={steps}", "model.bn=per_step")
    model, batch = tiny_conv(cfg), image_batch(tasks=2)
    params = meta_params(model, cfg)
    spec = make_spec(cfg)
    assert spec.collect_bn and not spec.bn_eval
    grads, metrics = ALGORITHMS["maml"](model, params, batch, spec)
    assert metrics["bn_mean"].shape == (steps + 1, 4, 4) and metrics["bn_var"].shape == (steps + 1, 4, 4)
    # Row 0, layer 0: the first convolution's output on the support sets at theta, summed over tasks.
    conv = model.body["conv"][0]
    first = [functional_call(conv, {"weight": params["body.conv.0.weight"], "bias": params["body.conv.0.bias"]},
                             (batch.xs[t],)) for t in range(2)]
    torch.testing.assert_close(metrics["bn_mean"][0, 0], sum(f.mean((0, 2, 3)) for f in first), **TIGHT)
    torch.testing.assert_close(metrics["bn_var"][0, 0], sum(f.var((0, 2, 3), unbiased=False) for f in first),
                               **TIGHT)
    # Training normalises with batch statistics in both modes, so the meta-gradient is the same.
    trans, trans_metrics = ALGORITHMS["maml"](model, params, batch, make_spec(trans_cfg))
    assert "bn_mean" not in trans_metrics
    assert_grads_close(grads, trans, **TIGHT)


def test_conv4_anil_per_step():
    cfg = conv_cfg("inner.steps=2", "model.bn=per_step", "algorithm.name=anil")
    model, batch = tiny_conv(cfg), image_batch(tasks=2)
    params = meta_params(model, cfg)
    grads, metrics = ALGORITHMS["anil"](model, params, batch, make_spec(cfg))
    expected = reference_grads(model, params, batch, steps=2, lr=0.1, loss="ce", head_only=True)
    assert_grads_close(grads, expected, rtol=1e-8, atol=1e-10)
    assert metrics["bn_mean"].shape == (3, 4, 4)
    # The body does not change within a task: every step sees the statistics MAML sees at step 0.
    _, maml_metrics = ALGORITHMS["maml"](model, params, batch, make_spec(cfg).with_(adapt="all"))
    for k in range(2):
        torch.testing.assert_close(metrics["bn_mean"][k], maml_metrics["bn_mean"][0], **TIGHT)
        torch.testing.assert_close(metrics["bn_var"][k], maml_metrics["bn_var"][0], **TIGHT)


def _set_running_stats(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "running_mean"):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))


def test_conv4_per_step_evaluation_uses_running_statistics():
    cfg = conv_cfg("model.bn=per_step", "inner.steps=1", "eval.steps=3", "eval.lr=0.05")
    model, batch = tiny_conv(cfg), image_batch(tasks=2)
    _set_running_stats(model)
    params = meta_params(model, cfg)
    spec = make_eval_spec(cfg)
    assert spec.bn_eval and spec.steps == 3 and spec.lr == 0.05 and spec.first_order
    assert not make_eval_spec(conv_cfg()).bn_eval
    curve = adapt_curve(model, params, batch, spec)
    assert curve["loss"].shape == (2, 4) and curve["acc"].shape == (2, 4)
    for t in range(2):
        fast = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        expected = []
        for k in range(4):
            with torch.no_grad():
                expected.append(F.cross_entropy(
                    functional_call(model, fast, (batch.xq[t],), {"step": k, "bn": "running"}), batch.yq[t]))
            if k < 3:
                loss = F.cross_entropy(
                    functional_call(model, fast, (batch.xs[t],), {"step": k, "bn": "running"}), batch.ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()))
                fast = {n: (v - 0.05 * g).detach().requires_grad_(True)
                        for (n, v), g in zip(fast.items(), grads)}
        torch.testing.assert_close(curve["loss"][t], torch.stack(expected), **TIGHT)
    # Batch statistics would give another curve.
    transductive = adapt_curve(model, params, batch, spec.with_(bn="transductive", bn_eval=False))
    assert (transductive["loss"] - curve["loss"]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- adaptation curves

def test_adapt_curve_matches_torch_sgd():
    cfg = sine_cfg("eval.steps=4", "eval.lr=0.03")
    model, batch = tiny_mlp(), sine_batch(3, shots=5, query=20)
    params = meta_params(model, cfg)
    spec = make_eval_spec(cfg)
    curve = adapt_curve(model, params, batch, spec)
    assert curve.keys() == {"loss"} and curve["loss"].shape == (3, 5)
    assert not curve["loss"].requires_grad
    for t in range(3):
        net = copy.deepcopy(model)
        net.load_state_dict(params)
        opt = torch.optim.SGD(net.parameters(), lr=0.03)
        expected = []
        for k in range(5):
            with torch.no_grad():
                expected.append(F.mse_loss(net(batch.xq[t]), batch.yq[t]))
            opt.zero_grad()
            F.mse_loss(net(batch.xs[t]), batch.ys[t]).backward()
            opt.step()
        torch.testing.assert_close(curve["loss"][t], torch.stack(expected), **TIGHT)
    looped = adapt_curve(model, params, batch, spec.with_(task_parallel="loop"))
    torch.testing.assert_close(looped["loss"], curve["loss"], **TIGHT)


def test_adapt_curve_classification_accuracy_matches_torch_sgd():
    cfg = conv_cfg("eval.steps=2", "eval.lr=0.2")
    model, batch = tiny_conv(cfg), image_batch(tasks=2, query=4)
    params = meta_params(model, cfg)
    curve = adapt_curve(model, params, batch, make_eval_spec(cfg))
    for t in range(2):
        net = copy.deepcopy(model)
        net.load_state_dict(params, strict=False)
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        losses, accs = [], []
        for k in range(3):
            with torch.no_grad():
                out = net(batch.xq[t])
            losses.append(F.cross_entropy(out, batch.yq[t]))
            accs.append((out.argmax(-1) == batch.yq[t]).float().mean())
            opt.zero_grad()
            F.cross_entropy(net(batch.xs[t]), batch.ys[t]).backward()
            opt.step()
        torch.testing.assert_close(curve["loss"][t], torch.stack(losses), **TIGHT)
        torch.testing.assert_close(curve["acc"][t], torch.stack(accs).to(curve["acc"].dtype))


# ----------------------------------------------------------------------- task_parallel: auto, metrics

def test_choose_task_parallel_returns_the_faster_mode():
    from metadist.algorithms.batching import choose_task_parallel
    from metadist.algorithms.spec import TASK_PARALLEL

    model, batch = tiny_mlp(), sine_batch(3)
    cfg = sine_cfg()
    params = meta_params(model, cfg)
    calls = []

    def timed(model_, params_, batch_, spec_):
        # loop is made deliberately slow, so the measurement must pick vmap.
        calls.append(spec_.task_parallel)
        if spec_.task_parallel == "loop":
            import time
            time.sleep(0.02)
        return ALGORITHMS["maml"](model_, params_, batch_, spec_)

    assert choose_task_parallel(timed, model, params, batch, make_spec(cfg), repeats=2) == "vmap"
    # One warm-up per mode, then the timed calls alternate.
    assert calls == ["vmap", "loop", "vmap", "loop", "vmap", "loop"]
    assert set(calls) == set(TASK_PARALLEL)


@pytest.mark.parametrize("mode", ["auto", "vmapp", ""])
def test_a_spec_takes_only_a_resolved_mode(mode):
    # `auto` (or a typo) used to reach the batching layer and run as vmap without a word.
    with pytest.raises(ValueError, match="task_parallel.*allowed: vmap, loop"):
        InnerSpec(task_parallel=mode)
    with pytest.raises(ValueError, match="resolve `auto`"):
        make_spec(sine_cfg("algorithm.task_parallel=auto"))
    assert make_spec(sine_cfg("algorithm.task_parallel=auto"), task_parallel="loop").task_parallel == "loop"


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_plotted_fits_adapt_exactly_as_evaluation_does(name, mode):
    # The fit plot's predictions come from the evaluation's own adaptation: for ANIL the body stays
    # fixed (the plot used to adapt every parameter), for Meta-SGD the learned rates are used.
    from metadist.algorithms.evaluate import adapted_outputs

    model, batch = tiny_mlp(), sine_batch(3)
    cfg, params = _params_for(model, name)
    params = {k: v + 0.3 * torch.randn_like(v) if "/" not in k else v for k, v in params.items()}
    spec = make_eval_spec(cfg, steps=3, task_parallel=mode)
    outs = adapted_outputs(model, params, batch, spec)
    assert outs.shape == (3, 4, *batch.yq.shape[1:])
    mse = ((outs - batch.yq.unsqueeze(1)) ** 2).mean(dim=(-2, -1))
    torch.testing.assert_close(mse, adapt_curve(model, params, batch, spec)["loss"], **TIGHT)


def test_choose_task_parallel_skips_a_mode_that_fails():
    from metadist.algorithms.batching import choose_task_parallel

    model, batch = tiny_mlp(), sine_batch(2)
    cfg = sine_cfg()

    def no_vmap(model_, params_, batch_, spec_):
        if spec_.task_parallel == "vmap":
            raise RuntimeError("Batching rule not implemented for aten::something")
        return ALGORITHMS["maml"](model_, params_, batch_, spec_)

    with pytest.warns(UserWarning, match="task_parallel=vmap failed"):
        assert choose_task_parallel(no_vmap, model, meta_params(model, cfg), batch, make_spec(cfg)) == "loop"


@pytest.mark.parametrize("name", ["maml", "anil", "reptile"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_pre_adaptation_metrics_are_optional_and_change_nothing_else(name, mode):
    model, batch = tiny_mlp(), sine_batch(3)
    cfg, params = _params_for(model, name)
    spec = make_spec(cfg).with_(task_parallel=mode)
    with_before, m1 = ALGORITHMS[name](model, params, batch, spec)
    without, m2 = ALGORITHMS[name](model, params, batch, spec.with_(report_before=False))
    assert_grads_close(without, with_before, **TIGHT)
    assert "loss_before" in m1 and "loss_before" not in m2
    assert set(m1) - set(m2) == {"loss_before"}
    for k in m2:
        torch.testing.assert_close(m2[k], m1[k], **TIGHT)
