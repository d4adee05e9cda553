"""Half-cheetah locomotion on gymnasium's MuJoCo (the `mujoco` extra): goals, start states, the rollout
against gymnasium's own step, and two meta-iterations of each debug job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason='the locomotion tasks need the mujoco extra: pip install -e ".[mujoco]"')
pytest.importorskip("mujoco", reason='the locomotion tasks need the mujoco extra: pip install -e ".[mujoco]"')

from metadist.runtime.driver import Trainer  # noqa: E402
from metadist.tasks.locomotion import CTRL_COST, LocomotionTasks, _make_env  # noqa: E402

from ..conftest import ROOT  # noqa: E402


def test_goals_are_the_papers_velocities_and_directions_whatever_the_batch():
    vel = LocomotionTasks(seed=1).goals("train", 3, range(2000))
    assert vel.shape == (2000, 1) and vel.min() >= 0 and vel.max() < 2
    assert abs(vel.mean().item() - 1) < 0.05
    assert torch.equal(LocomotionTasks(seed=1).goals("train", 3, [7])[0], vel[7])
    direction = LocomotionTasks(seed=1, objective="direction").goals("train", 3, range(2000))
    assert set(direction.flatten().tolist()) == {-1.0, 1.0} and abs(direction.mean().item()) < 0.1


def test_start_states_are_gymnasiums_reset_noise_from_the_tasks_own_draws():
    tasks = LocomotionTasks(seed=1)
    s = tasks.starts("train", 0, range(3), phase=0, trajectories=400)
    assert s.shape == (3, 400, 18)
    qpos, qvel = s[..., :9], s[..., 9:]
    assert qpos.abs().max() <= 0.1 and abs(qpos.std().item() - 0.1 / 3 ** 0.5) < 0.005  # U[-0.1, 0.1]
    assert abs(qvel.std().item() - 0.1) < 0.005 and abs(qvel.mean().item()) < 0.005  # 0.1 N(0, 1)
    assert torch.equal(tasks.starts("train", 0, [2], phase=0, trajectories=400)[0], s[2])
    assert not torch.equal(tasks.starts("train", 0, range(3), phase=1, trajectories=400), s)


def test_a_rollout_steps_as_gymnasiums_half_cheetah_and_pays_the_authors_rewards():
    tasks = LocomotionTasks(seed=2, horizon=30)
    goals = torch.tensor([[0.5], [1.5]])
    noise = tasks.noise("train", 0, range(2), 0, 3)
    start = tasks.starts("train", 0, range(2), 0, 3)
    run = tasks.rollout(lambda obs, z: 0.8 * z, goals, noise, start)  # actions beyond the box get clipped
    assert run.obs.shape == (2, 3, 30, 17) and run.actions.shape == (2, 3, 30, 6) and run.mask.all()
    # The same trajectory through gymnasium's own environment and step.
    env = _make_env()  # gymnasium.make("HalfCheetah-v5"), without MuJoCo's log file
    env.reset(seed=0)
    env.set_state(env.init_qpos + start[1, 2, :9].double().numpy(), env.init_qvel + start[1, 2, 9:].double().numpy())
    obs = env._get_obs()
    for k in range(30):
        np.testing.assert_allclose(run.obs[1, 2, k].numpy(), obs, rtol=1e-5, atol=1e-5)
        a = np.clip(run.actions[1, 2, k].double().numpy(), -1, 1)
        obs, _, _, _, info = env.step(a)
        expected = -abs(info["x_velocity"] - 1.5) - CTRL_COST * (a * a).sum()
        assert run.rewards[1, 2, k].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # Direction tasks are paid the velocity times the direction.
    back = LocomotionTasks(seed=2, objective="direction", horizon=30)
    v = torch.tensor([[1.0, -2.0]])
    a = torch.zeros(1, 2, 6)
    assert torch.equal(back.rewards(v, a, torch.tensor([[-1.0]])), torch.tensor([[-1.0, 2.0]]))


def test_a_tasks_trajectories_do_not_depend_on_the_tasks_beside_it():
    tasks = LocomotionTasks(seed=4, horizon=20)
    batch = tasks.sample(5, range(3), shots=2, query=2)
    act = lambda obs, z: torch.tanh(obs[..., :6]) + 0.3 * z  # noqa: E731
    both = batch.rollout(act, 0)
    alone = tasks.sample(5, range(2, 3), shots=2, query=2).rollout(act, 0)
    assert torch.equal(both.obs[2], alone.obs[0]) and torch.equal(both.rewards[2], alone.rewards[0])


@pytest.mark.parametrize("objective", ["vel", "dir"])
def test_two_meta_iterations_of_the_debug_job_run_and_evaluate(objective, tmp_path):
    from metadist.config import load_config

    cfg = load_config(ROOT / f"jobs/rl/maml-cheetah-{objective}-debug.yaml", [
        f"train.out_dir={tmp_path / 'runs'}", "train.steps=2", "runtime.threads=1", "task.horizon=50",
        "task.shots=5", "task.query=5", "eval.shots=5"])
    trainer = Trainer(cfg)
    summary = trainer.fit(progress=False)
    steps = [r for r in trainer.history if "trpo_kl" in r]
    assert len(steps) == 2 and all(r["trpo_kl"] <= cfg.rl.max_kl for r in steps)
    rows = summary["eval"]["rows"]
    assert [r["steps"] for r in rows] == [0, 1, 2] and all(np.isfinite(r["mean"]) and r["diverged"] == 0 for r in rows)
