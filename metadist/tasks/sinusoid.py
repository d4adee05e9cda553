"""Sinusoid regression tasks, exactly the MAML paper's protocol (section 5.1).

y = A sin(x + phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]. Task `i` of outer step `s` is a pure
function of (seed, split, s, i): each task gets its own generator seeded from a hash of those four
numbers, so how tasks are split across workers, or a worker being replaced, cannot change them.
The uniforms come from a counter-based hash (splitmix64 of the task seed and the draw's index),
vectorised in torch: one generator object per task cost more than the meta-gradient of a sinusoid step.
"""

from __future__ import annotations

import torch

from metadist.config import SPLITS
from metadist.episode import Episode, episode_range
from metadist.tasks.describe import procedural

_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def task_seed(seed: int, split: str, step: int, index: int) -> int:
    """A 63-bit seed for one task, well mixed so neighbouring (step, index) pairs are unrelated."""
    h = _splitmix(seed)
    for v in (SPLITS[split], step, index):
        h = _splitmix(h ^ (v & _MASK))
    return h >> 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    # Logical right shift on int64 (torch's >> is arithmetic and would smear the sign bit).
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (multiplication wraps mod 2^64, as the hash needs)."""
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def task_seeds(seed: int, split: str, step: int, indices) -> torch.Tensor:
    """`task_seed` for many indices at once (equal to it element-wise)."""
    h = _splitmix(seed)
    for v in (SPLITS[split], step):
        h = _splitmix(h ^ (v & _MASK))
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    return _lsr(_mix(_signed(h) ^ idx), 1)


def uniforms(seeds: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """(len(seeds), n) float64 uniforms in [0, 1), draws start..start+n-1 of each task's stream: draw j of
    task t is splitmix64(seed_t + (j+1)*golden)."""
    x = _mix(seeds[:, None] + torch.arange(start, start + n, dtype=torch.int64)[None, :] * _GOLDEN)
    return _lsr(x, 11).double() * (2.0 ** -53)


class SinusoidTasks:
    """Draws sinusoid episodes: `sample(step, indices)` for training, `fixed(split, n)` for evaluation."""

    def __init__(self, seed: int, amplitude=(0.1, 5.0), phase=(0.0, torch.pi), x_range=(-5.0, 5.0)):
        self.seed = seed
        self.amplitude = tuple(amplitude)
        self.phase = tuple(phase)
        self.x_range = tuple(x_range)

    @classmethod
    def from_config(cls, cfg) -> "SinusoidTasks":
        t = cfg.task
        return cls(cfg.seed, t.amplitude, t.phase, t.x_range)

    def episodes(self, split: str, step: int, indices, shots: int, query: int) -> Episode:
        """Tasks `indices` of `step` in `split`, each with `shots` support and `query` query points."""
        u = uniforms(task_seeds(self.seed, split, step, indices), 2 + shots + query)
        amp = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[:, 0]
        phase = self.phase[0] + (self.phase[1] - self.phase[0]) * u[:, 1]
        x = (self.x_range[0] + (self.x_range[1] - self.x_range[0]) * u[:, 2:]).unsqueeze(-1)
        y = amp[:, None, None] * torch.sin(x + phase[:, None, None])
        x, y = x.float(), y.float()
        return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:],
                       {"amplitude": amp.float(), "phase": phase.float()})

    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        """Training tasks for one outer step."""
        return self.episodes("train", step, indices, shots, query)

    def fixed(self, split: str, n: int | range, shots: int, query: int) -> Episode:
        """The fixed evaluation list for `split` (its first n tasks, or those of range n): the same
        tasks for every run with this seed."""
        # Step -1 is never a training step, so evaluation tasks cannot coincide with training ones.
        return self.episodes(split, -1, episode_range(n), shots, query)

    def dataset(self, split: str) -> dict:
        """This task source's description for the run record (`metadist.tasks.describe`)."""
        return procedural("sinusoid", split, {"seed": self.seed, "amplitude": list(self.amplitude),
                                              "phase": list(self.phase), "x_range": list(self.x_range)})
