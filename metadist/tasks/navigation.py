"""2-D navigation, the MAML paper's reinforcement-learning task (section 5.3, appendix A.2), as batched
tensors: tasks x trajectories x 2, no gym and no sampler processes.

A point agent starts at the origin and must reach a goal drawn uniformly from [-0.5, 0.5]^2. It observes
its position, acts with a velocity clipped to [-0.1, 0.1] per coordinate, and is rewarded minus its
distance to the goal after the move. The policy's action is scaled by `action_scale` (0.1) before the
clip, as the authors' code does (rllab's `normalize` maps actions in [-1, 1] onto the action box), so a
standard deviation of 1 is one maximal move, not ten. A trajectory ends within 0.01 of the goal (the
paper's words; the authors' code asks each coordinate to be within 0.01) or after 100 steps.

Everything random is a pure function of (seed, split, step, task index), as for the sinusoid: the goal
of a task, and the action noise of each of its sampling rounds (`phase`: before adaptation, after the
first step, ...). So the result does not depend on how tasks are split across workers, and a replaced
worker samples the same trajectories again.
"""

from __future__ import annotations

import torch

from metadist.config import RL_FAMILIES
from metadist.tasks.describe import procedural
from metadist.tasks.rl import RLTasks, Rollouts, family_settings


class NavigationTasks(RLTasks):
    """Goals and action noise of 2-D navigation tasks, and the batched environment step."""

    act_dim = RL_FAMILIES["navigation"][1]
    goal_draws = 2

    def __init__(self, seed: int, goal_range=(-0.5, 0.5), max_action: float = 0.1, horizon: int = 100,
                 success: float = 0.01, inner_steps: int = 1, action_scale: float = 0.1):
        super().__init__(seed, horizon, inner_steps)
        self.goal_range = tuple(goal_range)
        self.max_action = max_action
        self.action_scale = action_scale
        self.success = success

    @classmethod
    def from_config(cls, cfg) -> "NavigationTasks":
        return cls(cfg.seed, inner_steps=cfg.inner.steps, **family_settings(cfg.task))

    def make_goals(self, u: torch.Tensor) -> torch.Tensor:
        lo, hi = self.goal_range
        return (lo + (hi - lo) * u).float()

    def step(self, position: torch.Tensor, action: torch.Tensor, goal: torch.Tensor):
        """One move of every agent by `action_scale` times its action, clipped to `max_action` per
        coordinate: (next position, reward, reached). `goal` broadcasts against `position` (for example
        (T, 1, 2) against (T, N, 2))."""
        position = position + (action * self.action_scale).clamp(-self.max_action, self.max_action)
        distance = torch.linalg.vector_norm(position - goal, dim=-1)
        return position, -distance, distance < self.success

    def rollout(self, act, goals: torch.Tensor, noise: torch.Tensor, start=None) -> Rollouts:
        """Trajectories from the origin (every `start` is the origin) towards `goals` (T, 2), `noise`
        (T, N, H, 2) from `noise`.
        `act(obs, noise)` maps positions (T, N, 2) and the step's noise to actions (T, N, 2): the
        policy's mean plus its standard deviation times the noise. The environment is not differentiated
        through; the policy gradient needs only the actions' log-likelihood."""
        t, n, h, _ = noise.shape
        position = torch.zeros(t, n, 2, dtype=noise.dtype, device=noise.device)
        alive = torch.ones(t, n, dtype=noise.dtype, device=noise.device)
        obs, actions, rewards, mask = [], [], [], []
        goal = goals[:, None, :].to(noise.dtype)
        with torch.no_grad():
            for k in range(h):
                action = act(position, noise[:, :, k])
                obs.append(position)
                actions.append(action)
                mask.append(alive)
                position, reward, reached = self.step(position, action, goal)
                rewards.append(reward * alive)
                alive = alive * (~reached).to(alive.dtype)
        return Rollouts(torch.stack(obs, 2), torch.stack(actions, 2), torch.stack(rewards, 2),
                        torch.stack(mask, 2))

    def dataset(self, split: str) -> dict:
        """This task source's description for the run record (`metadist.tasks.describe`)."""
        return procedural("navigation", split, {"seed": self.seed, "goal_range": list(self.goal_range),
                                                "max_action": self.max_action, "horizon": self.horizon,
                                                "action_scale": self.action_scale,
                                                "success": self.success})
