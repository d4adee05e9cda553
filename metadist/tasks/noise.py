"""Random-pixel N-way K-shot episodes: the shape and cost of image episodes with nothing to learn.

For benchmarks and runtime tests that need Conv-4-sized work without a dataset. Like the sinusoid
family, episode i of step s is a pure function of (seed, split, step, i), so any worker can draw any
task and a run is reproducible whatever the worker count.
"""

from __future__ import annotations

import torch

from metadist.episode import Episode, episode_range
from metadist.tasks.describe import procedural
from metadist.tasks.sinusoid import task_seed


class NoiseImageTasks:
    def __init__(self, seed: int, ways: int, channels: int, image_size: int):
        self.seed, self.ways, self.shape = seed, ways, (channels, image_size, image_size)

    @classmethod
    def from_config(cls, cfg) -> "NoiseImageTasks":
        return cls(cfg.seed, cfg.task.ways, cfg.model.channels, cfg.model.image_size)

    def episodes(self, split: str, step: int, indices, shots: int, query: int) -> Episode:
        parts = []
        for i in indices:
            g = torch.Generator().manual_seed(task_seed(self.seed, split, step, i) & (2 ** 63 - 1))
            xs = torch.randn(self.ways * shots, *self.shape, generator=g)
            xq = torch.randn(self.ways * query, *self.shape, generator=g)
            parts.append((xs, xq))
        ys = torch.arange(self.ways).repeat_interleave(shots).expand(len(parts), -1).contiguous()
        yq = torch.arange(self.ways).repeat_interleave(query).expand(len(parts), -1).contiguous()
        return Episode(torch.stack([p[0] for p in parts]), ys, torch.stack([p[1] for p in parts]), yq)

    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        return self.episodes("train", step, indices, shots, query)

    def fixed(self, split: str, n: int | range, shots: int, query: int) -> Episode:
        return self.episodes(split, -1, episode_range(n), shots, query)

    def dataset(self, split: str) -> dict:
        """This task source's description for the run record (`metadist.tasks.describe`)."""
        return procedural("noise", split, {"seed": self.seed, "ways": self.ways, "shape": list(self.shape)})
