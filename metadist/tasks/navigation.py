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

from dataclasses import dataclass

import torch

from metadist.episode import episode_range
from metadist.tasks.describe import procedural
from metadist.tasks.sinusoid import task_seeds, uniforms

# Draws per task before the noise: the goal's two coordinates.
_GOAL_DRAWS = 2


@dataclass
class Rollouts:
    """Sampled trajectories of T tasks x N trajectories x H steps (masked after a trajectory ends)."""

    obs: torch.Tensor
    """(T, N, H, 2) the position each action was taken from."""
    actions: torch.Tensor
    """(T, N, H, 2) the actions as sampled (before clipping): what the policy's log-likelihood scores."""
    rewards: torch.Tensor
    """(T, N, H) minus the distance to the goal after each move; 0 after the end."""
    mask: torch.Tensor
    """(T, N, H) 1.0 for the steps a trajectory took, 0.0 after it ended."""

    def returns(self) -> torch.Tensor:
        """(T, N) undiscounted return of each trajectory: the paper's evaluation measure."""
        return (self.rewards * self.mask).sum(-1)


@dataclass
class NavigationBatch:
    """Tasks `indices` of outer step `step` in `split`: their goals, and the action noise of each sampling
    round on demand (`noise(phase)`), on `device`. `shots` trajectories are sampled in each round an inner
    step learns from, `query` in round `post_round` (after the last inner step of training)."""

    env: "NavigationTasks"
    split: str
    step: int
    indices: range
    goals: torch.Tensor
    shots: int
    query: int
    post_round: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def num_tasks(self) -> int:
        return len(self.indices)

    def noise(self, phase: int) -> torch.Tensor:
        """(T, N, H, 2) the noise of sampling round `phase` (0: before adaptation, k: after step k)."""
        n = self.query if phase == self.post_round else self.shots
        return self.env.noise(self.split, self.step, self.indices, phase, n).to(self.device)

    def to(self, device) -> "NavigationBatch":
        return NavigationBatch(self.env, self.split, self.step, self.indices, self.goals.to(device),
                               self.shots, self.query, self.post_round, torch.device(device))


class NavigationTasks:
    """Goals and action noise of 2-D navigation tasks, and the batched environment step."""

    def __init__(self, seed: int, goal_range=(-0.5, 0.5), max_action: float = 0.1, horizon: int = 100,
                 success: float = 0.01, inner_steps: int = 1, action_scale: float = 0.1):
        self.seed = seed
        self.goal_range = tuple(goal_range)
        self.max_action = max_action
        self.action_scale = action_scale
        self.horizon = horizon
        self.success = success
        self.inner_steps = inner_steps  # training's sampling rounds before the post-update one

    @classmethod
    def from_config(cls, cfg) -> "NavigationTasks":
        t = cfg.task
        return cls(cfg.seed, t.goal_range, t.max_action, t.horizon, inner_steps=cfg.inner.steps,
                   action_scale=t.action_scale)

    def sample(self, step: int, indices, shots: int, query: int) -> NavigationBatch:
        """Training tasks for one outer step: `shots` trajectories for each inner step, `query` after the
        last."""
        indices = episode_range(indices)
        return NavigationBatch(self, "train", step, indices, self.goals("train", step, indices), shots, query,
                               post_round=self.inner_steps)

    def fixed(self, split: str, n: int | range, shots: int, query: int) -> NavigationBatch:
        """The fixed evaluation goals of `split` (its first n, or those of range n), with `shots`
        trajectories in every sampling round; the same for every run with this seed."""
        indices = episode_range(n)
        # Step -1 is never a training step, so evaluation goals cannot coincide with training ones.
        return NavigationBatch(self, split, -1, indices, self.goals(split, -1, indices), shots, shots)

    def goals(self, split: str, step: int, indices) -> torch.Tensor:
        """(T, 2) the goals of tasks `indices` of outer step `step` in `split`."""
        u = uniforms(task_seeds(self.seed, split, step, indices), _GOAL_DRAWS)
        lo, hi = self.goal_range
        return (lo + (hi - lo) * u).float()

    def noise(self, split: str, step: int, indices, phase: int, trajectories: int) -> torch.Tensor:
        """(T, N, H, 2) standard normal action noise for sampling round `phase` of each task: round 0
        before adaptation, round k after the k-th gradient step. Box-Muller on the task's own uniforms,
        after its goal's draws, so no round shares a draw with another or with the goal."""
        n = trajectories * self.horizon * 2
        start = _GOAL_DRAWS + phase * 2 * n
        u = uniforms(task_seeds(self.seed, split, step, indices), start + 2 * n)[:, start:]
        u1, u2 = u[:, :n], u[:, n:]
        z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * torch.pi * u2)  # log1p(-u): u may be 0
        return z.float().view(len(u), trajectories, self.horizon, 2)

    def step(self, position: torch.Tensor, action: torch.Tensor, goal: torch.Tensor):
        """One move of every agent by `action_scale` times its action, clipped to `max_action` per
        coordinate: (next position, reward, reached). `goal` broadcasts against `position` (for example
        (T, 1, 2) against (T, N, 2))."""
        position = position + (action * self.action_scale).clamp(-self.max_action, self.max_action)
        distance = torch.linalg.vector_norm(position - goal, dim=-1)
        return position, -distance, distance < self.success

    def rollout(self, act, goals: torch.Tensor, noise: torch.Tensor) -> Rollouts:
        """Trajectories from the origin towards `goals` (T, 2), `noise` (T, N, H, 2) from `noise`.
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
