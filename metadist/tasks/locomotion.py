"""Half-cheetah locomotion, the MAML paper's goal-velocity and goal-direction tasks (section 5.3), on
gymnasium's MuJoCo HalfCheetah (`pip install -e ".[mujoco]"`).

A task asks the cheetah to run at a goal velocity drawn from U[goal_range] (`velocity`; the paper's
U[0, 2]) or forward or backward, each with probability 1/2 (`direction`). The reward is the authors':
minus |forward velocity - goal| (velocity) or the forward velocity times the direction (direction),
minus 0.05 times the squared action; trajectories last `horizon` (200) steps and never end early.
Actions are clipped to the actuators' box [-1, 1], as rllab's `normalize` does in the authors' code.

Differences from the authors' rllab environment, kept because they come with gymnasium's: the
observation is gymnasium's 17 numbers (joint positions but the root's x, and velocities), without the
torso's centre of mass; the forward velocity is the root's x velocity over a step, not the torso's
centre-of-mass velocity.

gymnasium gives the MuJoCo model, its frame skip, its initial state and the observation. A worker makes
one gymnasium environment and keeps one MuJoCo state (`MjData`) per trajectory of its shard, stepped in
a loop with the policy batched over all of them: half the time of calling each environment's `step`
(which also computes gymnasium's own rewards and info), and one model load instead of one per
trajectory. The start states (gymnasium's: uniform noise of 0.1 on the joint positions, normal noise of
0.1 on the velocities) and the action noise come from the task's own stream (`tasks.rl`), not from
gymnasium's generator, so a round's trajectories are a pure function of (seed, split, step, task,
round) as in navigation.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from metadist.config import RL_FAMILIES
from metadist.errors import UserError
from metadist.tasks.describe import procedural
from metadist.tasks.rl import RLTasks, Rollouts, box_muller, family_settings

ENV_ID = "HalfCheetah-v5"
_NQ = _NV = 9  # the half-cheetah's joint positions (the root's x, z, angle, six joints) and velocities
CTRL_COST = 0.05  # the authors' 0.5 * 1e-1 per squared action
RESET_NOISE = 0.1  # gymnasium's reset_noise_scale for the half-cheetah


def _make_env():
    try:
        import gymnasium
        import mujoco
    except ImportError:
        raise UserError('task.family locomotion needs gymnasium and mujoco: pip install -e ".[mujoco]"') from None
    # MuJoCo 3.17 warns that gymnasium's half-cheetah model uses a deprecated attribute, and writes the
    # warning to MUJOCO_LOG.TXT in the working directory. The model is gymnasium's, not the user's: that
    # warning is dropped, any other goes through Python's warnings, and no file is written.
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda msg: None if "settotalmass" in msg else warnings.warn(f"MuJoCo: {msg}"))
    try:
        return gymnasium.make(ENV_ID).unwrapped  # no wrappers: the time limit and checks are ours
    except (ImportError, gymnasium.error.DependencyNotInstalled) as e:
        raise UserError(f'task.family locomotion needs mujoco ({e}): pip install -e ".[mujoco]"') from None
    finally:
        mujoco.set_mju_user_warning(previous)


def _observe(states) -> torch.Tensor:
    # gymnasium's HalfCheetah-v5 observation: the joint positions but the root's x, then the velocities.
    return torch.from_numpy(np.stack([np.concatenate([d.qpos[1:], d.qvel]) for d in states])).float()


class LocomotionTasks(RLTasks):
    """Goals, action noise and start states of half-cheetah tasks, and batched rollouts on gymnasium."""

    act_dim = RL_FAMILIES["locomotion"][1]
    goal_draws = 1
    start_draws = _NQ + 2 * _NV  # uniforms for the position noise, Box-Muller pairs for the velocity's

    def __init__(self, seed: int, objective: str = "velocity", goal_range=(0.0, 2.0), horizon: int = 200,
                 inner_steps: int = 1, max_action: float = 1.0, action_scale: float = 1.0):
        super().__init__(seed, horizon, inner_steps)
        self.objective = objective
        self.goal_range = tuple(goal_range)
        self.max_action = max_action
        self.action_scale = action_scale
        self._env = None
        self._states: list = []

    @classmethod
    def from_config(cls, cfg) -> "LocomotionTasks":
        return cls(cfg.seed, cfg.task.objective, inner_steps=cfg.inner.steps, **family_settings(cfg.task))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_states": []}  # environments are made where they run

    def make_goals(self, u: torch.Tensor) -> torch.Tensor:
        """(T, 1): the goal velocity, or the direction (+1 forward, -1 backward)."""
        if self.objective == "direction":
            return torch.where(u < 0.5, -1.0, 1.0).float()
        lo, hi = self.goal_range
        return (lo + (hi - lo) * u).float()

    def make_starts(self, u: torch.Tensor) -> torch.Tensor:
        """(T, N, 18) offsets from the model's initial joint positions (9) and velocities (9)."""
        qpos = RESET_NOISE * (2.0 * u[..., :_NQ] - 1.0)
        qvel = RESET_NOISE * box_muller(u[..., _NQ:])
        return torch.cat([qpos, qvel], -1)

    def states(self, n: int) -> tuple:
        """(gymnasium environment, `n` MuJoCo states of its model): made once per worker and kept."""
        import mujoco

        if self._env is None:
            self._env = _make_env()
        while len(self._states) < n:
            self._states.append(mujoco.MjData(self._env.model))
        return self._env, self._states[:n]

    def rewards(self, velocity: torch.Tensor, actions: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        """(T, N) the reward of one step: forward `velocity` (T, N), clipped `actions` (T, N, A), `goals`
        (T, 1)."""
        ctrl = CTRL_COST * (actions * actions).sum(-1)
        if self.objective == "direction":
            return goals * velocity - ctrl
        return -(velocity - goals).abs() - ctrl

    def rollout(self, act, goals: torch.Tensor, noise: torch.Tensor, start=None) -> Rollouts:
        """Trajectories of `horizon` steps from the `start` offsets (T, N, 18) with `noise` (T, N, H, 6).
        `act(obs, noise)` maps observations (T, N, 17) and the step's noise to actions (T, N, 6)."""
        import mujoco

        t, n, h, _ = noise.shape
        env, states = self.states(t * n)
        model, skip = env.model, env.frame_skip
        start = start.reshape(t * n, -1).double().numpy()
        for data, s in zip(states, start):
            mujoco.mj_resetData(model, data)
            data.qpos[:] = env.init_qpos + s[:_NQ]
            data.qvel[:] = env.init_qvel + s[_NQ:]
            mujoco.mj_forward(model, data)
        device = noise.device
        goals = goals.cpu()
        obs_all, actions, rewards = [], [], []
        velocity = np.empty(t * n)
        obs = _observe(states).view(t, n, -1).to(device)
        with torch.no_grad():
            for k in range(h):
                action = act(obs, noise[:, :, k])
                clipped = (action * self.action_scale).clamp(-self.max_action, self.max_action).cpu()
                a = clipped.reshape(t * n, -1).double().numpy()
                for i, data in enumerate(states):
                    x = data.qpos[0]
                    data.ctrl[:] = a[i]
                    mujoco.mj_step(model, data, nstep=skip)
                    velocity[i] = (data.qpos[0] - x) / env.dt  # gymnasium's x_velocity
                obs_all.append(obs)
                actions.append(action)
                rewards.append(self.rewards(torch.from_numpy(velocity).float().view(t, n), clipped, goals))
                obs = _observe(states).view(t, n, -1).to(device)
        rewards = torch.stack(rewards, 2).to(device)
        return Rollouts(torch.stack(obs_all, 2), torch.stack(actions, 2), rewards, torch.ones_like(rewards))

    def dataset(self, split: str) -> dict:
        """This task source's description for the run record (`metadist.tasks.describe`)."""
        return procedural("locomotion", split, {"seed": self.seed, "env": ENV_ID, "objective": self.objective,
                                                "goal_range": list(self.goal_range), "horizon": self.horizon,
                                                "max_action": self.max_action, "action_scale": self.action_scale})
