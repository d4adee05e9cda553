"""2-D navigation as batched tensors, and the policy-gradient pieces of MAML-RL (pure torch)."""

from __future__ import annotations

import pytest
import torch

from metadist.algorithms import policy_gradient as pg
from metadist.algorithms.spec import InnerSpec
from metadist.tasks.navigation import NavigationTasks


@pytest.fixture
def nav():
    return NavigationTasks(seed=3, action_scale=1.0)  # actions are velocities in the tests below


def test_goals_are_uniform_in_the_square_and_independent_of_the_batch(nav):
    goals = nav.goals("train", 7, range(2000))
    assert goals.shape == (2000, 2) and goals.min() >= -0.5 and goals.max() < 0.5
    assert abs(goals.mean().item()) < 0.02 and abs(goals.var().item() - 1 / 12) < 0.005
    # Task 4 of step 7 is the same goal whichever tasks are drawn beside it (any worker split).
    assert torch.equal(nav.goals("train", 7, [3, 4])[1], goals[4])
    assert not torch.equal(nav.goals("train", 8, [4])[0], goals[4])  # another step, another goal
    assert not torch.equal(nav.goals("test", 7, [4])[0], goals[4])  # another split, another goal


def test_action_noise_is_standard_normal_per_task_and_round(nav):
    z = nav.noise("train", 2, [0, 1, 5], phase=0, trajectories=20)
    assert z.shape == (3, 20, 100, 2)
    for task in z:  # 4,000 draws each
        assert abs(task.mean().item()) < 0.1 and abs(task.std().item() - 1) < 0.1
    assert torch.equal(nav.noise("train", 2, [5], phase=0, trajectories=20)[0], z[2])
    after = nav.noise("train", 2, [0, 1, 5], phase=1, trajectories=20)
    assert not torch.allclose(after, z)  # the round after a gradient step samples afresh
    # Rounds do not overlap: the uncorrelated draws of two rounds.
    corr = torch.corrcoef(torch.stack([z.flatten(), after.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.05


@pytest.mark.parametrize("shots, query", [(20, 20), (20, 10), (10, 20)])
def test_sampling_rounds_of_different_sizes_take_consecutive_draws(nav, shots, query, monkeypatch):
    from metadist.tasks import rl

    batch = rl.RLBatch(nav, "train", 3, range(2), nav.goals("train", 3, range(2)), shots, query, post_round=2)
    spans, real = [], rl.uniforms
    monkeypatch.setattr(rl, "uniforms", lambda seeds, n, start=0: spans.append((start, n)) or real(seeds, n, start))
    rounds = [batch.draws(p)[0] for p in range(3)]  # two rounds of `shots`, then `query` after step 2
    assert [r.shape[1] for r in rounds] == [shots, shots, query]
    # Each round's uniforms start where the previous round's end: none re-uses another's (a round of 10
    # after two of 20 used to start at draw 2 x 10 rounds' worth, inside the second round of 20).
    assert [start for start, _ in spans] == [nav.goal_draws, nav.goal_draws + spans[0][1],
                                             nav.goal_draws + spans[0][1] + spans[1][1]]
    assert [n for _, n in spans] == [2 * k * nav.horizon * 2 for k in (shots, shots, query)]
    if shots == query:  # equal rounds keep the layout of `noise`, the same draws as before
        assert all(torch.equal(rounds[p], nav.noise("train", 3, range(2), p, shots)) for p in range(3))


def test_a_move_is_clipped_and_rewarded_minus_the_distance_after_it(nav):
    pos, reward, reached = nav.step(torch.zeros(1, 2), torch.tensor([[0.5, -0.05]]), torch.tensor([[0.3, 0.0]]))
    assert torch.allclose(pos, torch.tensor([[0.1, -0.05]]))
    assert torch.allclose(reward, -torch.tensor([(0.2 ** 2 + 0.05 ** 2) ** 0.5]))
    assert not reached.any()
    _, reward, reached = nav.step(torch.zeros(1, 2), torch.tensor([[0.05, 0.0]]), torch.tensor([[0.055, 0.0]]))
    assert reached.all() and reward.item() == pytest.approx(-0.005, abs=1e-6)


def test_actions_are_scaled_before_the_clip_as_the_authors_code_does():
    nav = NavigationTasks(seed=3)  # action_scale 0.1: an action of 1 is one maximal move
    pos, _, _ = nav.step(torch.zeros(1, 2), torch.tensor([[0.5, -3.0]]), torch.tensor([[0.3, 0.0]]))
    assert torch.allclose(pos, torch.tensor([[0.05, -0.1]]))


def test_a_trajectory_ends_at_the_goal_and_standing_still_costs_the_whole_horizon(nav):
    goals = torch.tensor([[0.25, -0.15], [0.45, 0.4]])
    noise = torch.zeros(2, 3, 100, 2)

    def toward(obs, z):  # the oracle: straight at the goal, as fast as allowed
        return goals[:, None, :] - obs

    run = nav.rollout(toward, goals, noise)
    assert run.obs.shape == (2, 3, 100, 2) and run.rewards.shape == run.mask.shape == (2, 3, 100)
    # Goal 0 is 3 moves away (0.25 / 0.1), goal 1 5 moves (0.45 / 0.1): the rest of the horizon is masked.
    assert run.mask[0].sum(-1).tolist() == [3, 3, 3] and run.mask[1].sum(-1).tolist() == [5, 5, 5]
    expected0 = -sum(((0.25 - x) ** 2 + (-0.15 - y) ** 2) ** 0.5
                     for x, y in [(0.1, -0.1), (0.2, -0.15), (0.25, -0.15)])
    assert run.returns()[0, 0].item() == pytest.approx(expected0, abs=1e-6)
    still = nav.rollout(lambda obs, z: torch.zeros_like(obs), goals, noise)
    assert still.mask.all() and torch.allclose(still.returns(), -100 * goals.norm(dim=-1)[:, None].expand(2, 3))


def _trajectories(seed=0, t=3, n=4, h=12):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(t, n, h, 2, generator=g, dtype=torch.float64)
    rewards = -torch.rand(t, n, h, generator=g, dtype=torch.float64)
    lengths = torch.randint(3, h + 1, (t, n), generator=g)
    mask = (torch.arange(h)[None, None, :] < lengths[..., None]).double()
    return obs, rewards * mask, mask


def test_discounted_returns_and_gae_with_lambda_one_are_returns_minus_the_baseline():
    obs, rewards, mask = _trajectories()
    ret = pg.discounted_returns(rewards, mask, 0.9)
    t, n = 1, 2
    length = int(mask[t, n].sum())
    by_hand = [sum(0.9 ** j * rewards[t, n, k + j].item() for j in range(length - k)) for k in range(length)]
    assert ret[t, n, :length].tolist() == pytest.approx(by_hand) and (ret[t, n, length:] == 0).all()
    values = pg.fit_baseline(obs, ret, mask)
    assert torch.allclose(pg.gae(rewards, values, mask, 0.9, 1.0), (ret - values) * mask)
    # lambda = 0: the one-step TD errors.
    td = pg.gae(rewards, values, mask, 0.9, 0.0)
    k = length - 1  # the last step: no value after the end
    assert td[t, n, k].item() == pytest.approx(rewards[t, n, k].item() - values[t, n, k].item())


def test_the_baseline_recovers_a_linear_target_and_fits_each_task_alone():
    obs, _, mask = _trajectories()
    features = pg.baseline_features(obs, mask)
    w = torch.randn(features.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = features @ w  # exactly linear in the features, task by task
    # Without the ridge term the fit is exact; rllab's 1e-5 moves it by up to about 2e-3 here.
    assert torch.allclose(pg.fit_baseline(obs, target, mask, reg=1e-12), target * mask, atol=1e-7)
    values = pg.fit_baseline(obs, target, mask)
    assert torch.allclose(values, target * mask, atol=5e-3)
    other = target.clone()
    other[1] += 5.0  # another task's returns change: task 0's baseline does not
    assert torch.equal(pg.fit_baseline(obs, other, mask)[0], values[0])


def test_advantages_are_normalised_per_task_over_the_steps_taken():
    obs, rewards, mask = _trajectories()
    adv = pg.advantages(obs, rewards, mask)
    for task in range(3):
        taken = adv[task][mask[task].bool()]
        assert taken.mean().item() == pytest.approx(0, abs=1e-9) and taken.std(unbiased=False).item() == \
            pytest.approx(1, abs=1e-6)
    assert (adv[mask == 0] == 0).all()


def test_the_reinforce_loss_has_the_policy_gradient():
    obs, rewards, mask = _trajectories()
    adv = pg.advantages(obs, rewards, mask)
    log_std = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    actions = torch.randn_like(obs)
    dist = torch.distributions.Normal(torch.zeros_like(actions), log_std.exp())
    log_probs = dist.log_prob(actions).sum(-1)
    loss = pg.reinforce_loss(log_probs, adv, mask)
    assert loss.shape == (3,)
    (grad,) = torch.autograd.grad(loss.sum(), log_std)
    # d/d log_std of log N(a; 0, e^s) is a^2 e^{-2s} - 1 per coordinate.
    per_step = (actions ** 2 - 1) * (adv * mask / mask.sum((1, 2), keepdim=True))[..., None]
    assert torch.allclose(grad, -per_step.sum((0, 1, 2)))


def test_the_policy_is_a_gaussian_with_a_learned_state_independent_std():
    from metadist.models.policy import GaussianPolicy

    policy = GaussianPolicy()
    obs = torch.randn(5, 7, 2)
    out = policy(obs)
    assert out.shape == (5, 7, 4) and torch.equal(out[..., 2:], torch.zeros(5, 7, 2))  # log std 0: std 1.0
    assert sum(p.numel() for p in policy.parameters()) == 2 * 100 + 100 + 100 * 100 + 100 + 100 * 2 + 2 + 2
    actions = torch.randn(5, 7, 2)
    mean, log_std = out.chunk(2, -1)
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    assert torch.allclose(pg.gaussian_log_prob(out, actions), expected, atol=1e-6)


def test_the_inner_policy_gradient_step_has_the_second_order_meta_gradient():
    # The meta-objective of MAML-RL with fixed trajectories: each task adapts on its pre-update
    # trajectories, and its adapted policy's surrogate is taken on its post-update ones. The gradient
    # through the inner step (second order) against central finite differences, in float64.
    from torch.func import functional_call

    from metadist.models.policy import GaussianPolicy

    torch.manual_seed(0)
    model = GaussianPolicy(hidden=[6]).double()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    pre, post = _trajectories(seed=1, t=2, n=3, h=5), _trajectories(seed=2, t=2, n=3, h=5)
    g = torch.Generator().manual_seed(3)
    acts = [torch.randn(*o.shape, generator=g, dtype=torch.float64) for o, _, _ in (pre, post)]
    adv = [pg.advantages(o, r, m) for o, r, m in (pre, post)]

    def objective(p, first_order=False):
        total = 0.0
        for i in range(2):
            fast = pg.adapt_policy(model, p, pre[0][i], acts[0][i], adv[0][i], pre[2][i],
                                   InnerSpec(loss="pg", lr=0.5, first_order=first_order))
            lp = pg.gaussian_log_prob(functional_call(model, fast, (post[0][i],)), acts[1][i])
            total = total + pg.reinforce_loss(lp[None], adv[1][i][None], post[2][i][None])[0]
        return total

    leaves = {n: v.clone().requires_grad_() for n, v in params.items()}
    grads = torch.autograd.grad(objective(leaves), list(leaves.values()))
    first = torch.autograd.grad(objective(leaves, first_order=True), list(leaves.values()))
    for k in range(3):
        d = {n: torch.randn(v.shape, generator=g, dtype=torch.float64) for n, v in params.items()}
        eps = 1e-6
        plus = objective({n: params[n] + eps * d[n] for n in params}).item()
        minus = objective({n: params[n] - eps * d[n] for n in params}).item()
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((gr * d[n]).sum() for gr, n in zip(grads, params)).item()
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    # The loop path's plain autograd takes the same gradient as torch.func's.
    from metadist.algorithms.adaptation import plain_autograd

    with plain_autograd():
        looped = torch.autograd.grad(objective(leaves), list(leaves.values()))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, looped))
    # The second-order term matters here: first order is a different gradient.
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, first))
