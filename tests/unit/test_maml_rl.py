"""MAML for reinforcement learning on 2-D navigation (pure torch): the meta-gradient in both task modes,
ANIL's and Meta-SGD's inner steps, TRPO's products and step on the step's own trajectories, the
evaluation's rounds, and meta-training that works."""

from __future__ import annotations

import pytest
import torch

from metadist.algorithms import maml_rl, trpo
from metadist.algorithms import policy_gradient as pg
from metadist.algorithms.spec import InnerSpec
from metadist.models.policy import GaussianPolicy
from metadist.tasks.navigation import NavigationTasks

SPEC = InnerSpec(loss="pg", lr=0.1, task_parallel="vmap")


def _setup(hidden=(32, 32), tasks=4, trajectories=10, double=False):
    torch.manual_seed(0)
    model = GaussianPolicy(hidden=list(hidden))
    env = NavigationTasks(seed=0)
    batch = env.sample(0, range(tasks), trajectories, trajectories)
    if double:
        model = model.double()
        batch.goals = batch.goals.double()  # and so its noise
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, params, batch


def _rel(a: dict, b: dict) -> float:
    return (trpo.dot(*(2 * [{n: a[n] - b[n] for n in a}])).sqrt() / trpo.dot(b, b).sqrt()).item()


def test_the_meta_gradient_is_the_same_with_tasks_vmapped_or_looped():
    model, params, batch = _setup()
    g_vmap, m_vmap = maml_rl.maml(model, params, batch, SPEC)
    g_loop, m_loop = maml_rl.maml(model, params, batch, SPEC.with_(task_parallel="loop"))
    assert _rel(g_loop, g_vmap) < 1e-4
    assert m_vmap["tasks"].item() == 4 and torch.equal(m_vmap["return_before"], m_loop["return_before"])
    # The loss the trainer shows is minus the post-update return, summed over tasks.
    assert m_vmap["loss_after"].item() == pytest.approx(-m_vmap["return_after"].item())
    # First order drops the inner step's Hessian: a different meta-gradient.
    g_first, _ = maml_rl.maml(model, params, batch, SPEC.with_(first_order=True))
    assert _rel(g_first, g_vmap) > 1e-3


def test_anil_adapts_the_head_and_metasgd_uses_its_learned_rates():
    model, params, batch = _setup(tasks=1)
    samples = maml_rl.sample(model, params, batch, SPEC)
    task = (samples.pre_obs[0, 0], samples.pre_actions[0, 0], samples.pre_adv[0, 0], samples.pre_mask[0, 0])
    head = pg.adapt_policy(model, params, *task, SPEC.with_(adapt="head"))
    assert all(torch.equal(head[n], params[n]) for n in params if n.startswith("body."))
    assert all(not torch.equal(head[n], params[n]) for n in params if n.startswith("head."))
    plain = pg.adapt_policy(model, params, *task, SPEC)
    rates = {f"lr/{n}": torch.full_like(p, 0.2) for n, p in params.items()}
    learned = pg.adapt_policy(model, {**params, **rates}, *task, SPEC)
    assert set(learned) == set(params)  # the adapted policy has no rates of its own
    for n in params:  # twice the rate: twice the step
        assert torch.allclose(learned[n] - params[n], 2 * (plain[n] - params[n]), atol=1e-6)


def test_the_kl_products_exact_and_by_finite_differences_agree_on_a_small_network():
    # Through the inner step, in float64, with a finite-difference step small enough not to straddle a
    # switching ReLU (maml_rl.fvp says why the exact product is the default).
    model, params, batch = _setup(double=True)
    samples = maml_rl.sample(model, params, batch, SPEC)
    v = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
         for n, p in params.items()}
    exact = maml_rl.fvp(model, params, samples, SPEC, v, "exact")
    assert _rel(maml_rl.fvp(model, params, samples, SPEC, v, "finite_difference", fd_eps=1e-6), exact) < 1e-6
    # Looped tasks give the same product.
    looped = maml_rl.fvp(model, params, samples, SPEC.with_(task_parallel="loop"), v, "exact")
    assert _rel(looped, exact) < 1e-10
    # The kept graph's product (J'HJ at the sampling parameters) is the same Hessian, in both task modes,
    # and its gradient is the meta-gradient.
    for mode in ("vmap", "loop"):
        spec = SPEC.with_(task_parallel=mode)
        curvature = maml_rl.Curvature(model, params, samples, spec)
        assert _rel(curvature.fvp(v), exact) < 1e-10
        assert _rel(curvature.fvp(v, "finite_difference", 1e-6), exact) < 1e-6
        grads, _ = maml_rl.maml(model, params, batch, spec)
        assert _rel(curvature.grad(), grads) < 1e-10
    # At the sampling parameters the adapted policies are the sampling ones: the KL is zero and the
    # surrogate's ratio is one.
    loss, kl = maml_rl.surrogate(model, params, samples, SPEC)
    assert kl.item() == pytest.approx(0.0, abs=1e-12)
    expected = -sum(((samples.post_adv[i] * samples.post_mask[i]).sum() / samples.post_mask[i].sum())
                    for i in range(4))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-9)


def test_two_inner_steps_each_learn_from_their_own_round_and_the_meta_gradient_is_second_order():
    # Two inner steps: step 2 learns from trajectories of the policy after step 1. The meta-gradient on
    # the step's samples (kept graph, second order through both steps) against central finite
    # differences of the surrogate on the same samples, in float64.
    model, params, batch = _setup(hidden=(8,), tasks=2, trajectories=4, double=True)
    batch.post_round, batch.query = 2, 3
    spec = SPEC.with_(steps=2)
    samples = maml_rl.sample(model, params, batch, spec)
    assert samples.pre_obs.shape[:3] == (2, 2, 4) and samples.post_obs.shape[:2] == (2, 3)
    assert not torch.equal(samples.pre_obs[:, 0], samples.pre_obs[:, 1])
    grads = maml_rl.Curvature(model, params, samples, spec).grad()
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        d = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
        eps = 1e-6
        loss = lambda sign: maml_rl.surrogate(model, {n: params[n] + sign * eps * d[n] for n in params},  # noqa: E731
                                              samples, spec)[0].item()
        numeric = (loss(1) - loss(-1)) / (2 * eps)
        assert trpo.dot(grads, d).item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_a_trpo_step_lowers_the_surrogate_within_the_kl_bound(hvp):
    model, params, batch = _setup(double=True)
    grads, sums, curvature = maml_rl.trpo_start(model, params, batch, SPEC)
    n = batch.num_tasks
    new, info = trpo.outer_step(
        params, {k: g / n for k, g in grads.items()},
        lambda v: {k: x / n for k, x in curvature.fvp(v, hvp, 1e-6).items()},
        lambda p: tuple((torch.stack(maml_rl.surrogate(model, p, curvature.samples, SPEC)) / n).tolist()),
        max_kl=0.01)
    assert info["surrogate_after"] < info["surrogate_before"] and 0 < info["kl"] <= 0.01, info
    assert info["backtracks"] >= 0 and any(not torch.equal(new[k], params[k]) for k in params)


def test_evaluation_rounds_sample_afresh_after_every_step_at_the_later_rate():
    model, params, batch = _setup(tasks=3)
    spec = SPEC.with_(steps=2, first_order=True)
    curves = maml_rl.curves(model, params, batch, spec)["return"]
    assert curves.shape == (3, 3)
    # Round 0 is the unadapted policy's own trajectories on round-0 noise; the training sample's
    # pre-update returns are the same trajectories.
    samples = maml_rl.sample(model, params, batch, spec.with_(steps=1))
    assert torch.allclose(curves[:, 0].sum(), samples.metrics["return_before"])
    # So is round 1 the post-update sample: the same step on the same trajectories.
    assert torch.allclose(curves[:, 1].sum(), samples.metrics["return_after"], atol=1e-4)
    # The later rate changes the second step only.
    halved = maml_rl.curves(model, params, batch, spec.with_(later_lr=0.05))["return"]
    assert torch.equal(halved[:, :2], curves[:, :2]) and not torch.equal(halved[:, 2], curves[:, 2])


def test_a_policy_made_nan_by_its_steps_is_counted_as_diverged_not_averaged():
    from metadist.evaluation import report_of

    model, params, batch = _setup(tasks=3)
    params = dict(params)
    spec = SPEC.with_(steps=1, first_order=True)
    # A rate so large that the step overflows: the adapted policy's outputs, actions and returns are
    # not finite. The report counts such goals as diverged and leaves them out of the mean.
    curves = maml_rl.curves(model, params, batch, spec.with_(lr=1e38))
    assert torch.isfinite(curves["return"][:, 0]).all() and not torch.isfinite(curves["return"][:, 1]).any()
    report = report_of(curves, spec, split="test", shots=10, episodes=3)
    assert report["rows"][1]["diverged"] == 3 and report["rows"][0]["diverged"] == 0


@pytest.mark.slow
def test_maml_rl_meta_trains_the_policy_to_adapt_in_one_step():
    # 20 outer steps of second-order MAML (meta-batch 10, 20 trajectories per task, inner lr 0.1, Adam
    # 0.01 outside): one policy-gradient step from the meta-learned policy gains far more than one from
    # the initial policy. (Measured: post-update return -71 at step 0, about -20 over the last 5 steps;
    # the gain of the step from 4 to about 30.)
    torch.manual_seed(0)
    model = GaussianPolicy()
    env = NavigationTasks(seed=0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=0.01)
    gains, posts = [], []
    for step in range(20):
        grads, m = maml_rl.maml(model, params, env.sample(step, range(10), 20, 20), SPEC)
        for n, p in params.items():
            p.grad = grads[n] / 10
        opt.step()
        posts.append(m["return_after"].item() / 10)
        gains.append((m["return_after"] - m["return_before"]).item() / 10)
    assert posts[0] < -60 and sum(posts[-5:]) / 5 > -30, posts
    assert gains[0] < 5 and sum(gains[-5:]) / 5 > 15, gains
