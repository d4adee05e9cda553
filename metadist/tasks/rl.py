"""What the reinforcement-learning task families share: sampled trajectories as batched tensors, a task
batch that carries its environment, and goals, action noise and start states that are pure functions of
(seed, split, step, task index, sampling round).

A family (`navigation`, `locomotion`) subclasses `RLTasks` with its goals, its start states and its
`rollout`. Everything random comes from the task's own stream of uniforms (`tasks.sinusoid.uniforms`):
first the goal's draws, then, for each sampling round (`phase`: 0 before adaptation, k after the k-th
gradient step), the Box-Muller pairs of the action noise and the start states' draws. So the result does
not depend on how tasks are split across workers, and a replaced worker samples the same trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metadist.episode import episode_range
from metadist.tasks.sinusoid import task_seeds, uniforms


@dataclass
class Rollouts:
    """Sampled trajectories of T tasks x N trajectories x H steps (masked after a trajectory ends)."""

    obs: torch.Tensor
    """(T, N, H, O) the observation each action was taken from."""
    actions: torch.Tensor
    """(T, N, H, A) the actions as sampled (before clipping): what the policy's log-likelihood scores."""
    rewards: torch.Tensor
    """(T, N, H) the reward of each step; 0 after the end."""
    mask: torch.Tensor
    """(T, N, H) 1.0 for the steps a trajectory took, 0.0 after it ended."""

    def returns(self) -> torch.Tensor:
        """(T, N) undiscounted return of each trajectory: the paper's evaluation measure."""
        return (self.rewards * self.mask).sum(-1)


@dataclass
class RLBatch:
    """Tasks `indices` of outer step `step` in `split`: their goals, and each sampling round's
    trajectories on demand (`rollout(act, phase)`), on `device`. `shots` trajectories are sampled in each
    round an inner step learns from, `query` in round `post_round` (after the last inner step of
    training)."""

    env: "RLTasks"
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

    def trajectories(self, phase: int) -> int:
        return self.query if phase == self.post_round else self.shots

    def draws(self, phase: int) -> tuple:
        """(noise, starts) of sampling round `phase` (`RLTasks.round_draws`), after the draws of the
        rounds before it, whatever their sizes."""
        earlier = sum(self.trajectories(p) for p in range(phase))
        return self.env.round_draws(self.split, self.step, self.indices, phase, self.trajectories(phase), earlier)

    def rollout(self, act, phase: int) -> Rollouts:
        """Sampling round `phase` (0: before adaptation, k: after step k) with the policy
        `act(obs, noise)`: its action noise and start states. The noise takes the goals' device and dtype
        (a float64 batch is one whose goals are float64)."""
        noise, start = self.draws(phase)
        return self.env.rollout(act, self.goals, noise.to(self.goals), start)

    def to(self, device) -> "RLBatch":
        return RLBatch(self.env, self.split, self.step, self.indices, self.goals.to(device), self.shots,
                       self.query, self.post_round, torch.device(device))


_SETTINGS = ("goal_range", "horizon", "max_action", "action_scale")


def family_settings(task) -> dict:
    """The settings of config section `task` that were given (the others keep the family's defaults)."""
    return {k: getattr(task, k) for k in _SETTINGS if getattr(task, k) is not None}


def box_muller(u: torch.Tensor) -> torch.Tensor:
    """Standard normals from uniforms (..., 2n) -> (..., n)."""
    n = u.shape[-1] // 2
    u1, u2 = u[..., :n], u[..., n:]
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * torch.pi * u2)  # log1p(-u): u may be 0


class RLTasks:
    """Goals, action noise and start states of a reinforcement-learning task family; a subclass gives
    `act_dim`, `goal_draws`, `start_draws`, `make_goals`, `make_starts` and `rollout`."""

    act_dim: int
    goal_draws: int
    """Uniforms per task for its goal, before any round's."""
    start_draws: int = 0
    """Uniforms per trajectory for its start state (0: every trajectory starts in the same state)."""

    def __init__(self, seed: int, horizon: int, inner_steps: int = 1):
        self.seed = seed
        self.horizon = horizon
        self.inner_steps = inner_steps  # training's sampling rounds before the post-update one

    def sample(self, step: int, indices, shots: int, query: int) -> RLBatch:
        """Training tasks for one outer step: `shots` trajectories for each inner step, `query` after the
        last."""
        indices = episode_range(indices)
        return RLBatch(self, "train", step, indices, self.goals("train", step, indices), shots, query,
                       post_round=self.inner_steps)

    def fixed(self, split: str, n: int | range, shots: int, query: int) -> RLBatch:
        """The fixed evaluation goals of `split` (its first n, or those of range n), with `shots`
        trajectories in every sampling round; the same for every run with this seed."""
        indices = episode_range(n)
        # Step -1 is never a training step, so evaluation goals cannot coincide with training ones.
        return RLBatch(self, split, -1, indices, self.goals(split, -1, indices), shots, shots)

    def goals(self, split: str, step: int, indices) -> torch.Tensor:
        """(T, G) the goals of tasks `indices` of outer step `step` in `split`."""
        return self.make_goals(uniforms(task_seeds(self.seed, split, step, indices), self.goal_draws))

    def round_draws(self, split: str, step: int, indices, phase: int, trajectories: int,
                    earlier: int | None = None) -> tuple:
        """(noise, starts) of sampling round `phase` of each task (round 0 before adaptation, round k
        after the k-th gradient step): (T, N, H, A) standard normal action noise, and the trajectories'
        start states (`make_starts` of their uniforms), or None where every trajectory starts in the same
        state. Rounds follow the goal's draws one after the other, each the noise's draws then the
        starts'; `earlier` is the trajectory count of all rounds before this one (default: `phase` rounds
        of `trajectories`)."""
        per_trajectory = 2 * self.horizon * self.act_dim + self.start_draws
        noise_draws = 2 * trajectories * self.horizon * self.act_dim
        earlier = phase * trajectories if earlier is None else earlier
        u = uniforms(task_seeds(self.seed, split, step, indices), trajectories * per_trajectory,
                     start=self.goal_draws + earlier * per_trajectory)
        noise = box_muller(u[:, :noise_draws]).float().view(len(u), trajectories, self.horizon, self.act_dim)
        if not self.start_draws:
            return noise, None
        return noise, self.make_starts(u[:, noise_draws:].reshape(len(u), trajectories, self.start_draws))

    def noise(self, split: str, step: int, indices, phase: int, trajectories: int) -> torch.Tensor:
        """(T, N, H, A) the action noise of sampling round `phase` (`round_draws`)."""
        return self.round_draws(split, step, indices, phase, trajectories)[0]

    def starts(self, split: str, step: int, indices, phase: int, trajectories: int):
        """The start states of sampling round `phase` (`round_draws`), or None."""
        return self.round_draws(split, step, indices, phase, trajectories)[1]

    def make_goals(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_starts(self, u: torch.Tensor):
        raise NotImplementedError

    def rollout(self, act, goals: torch.Tensor, noise: torch.Tensor, start=None) -> Rollouts:
        raise NotImplementedError
