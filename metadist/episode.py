"""The one episode type: support and query tensors with labels, and a leading task dimension."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Episode:
    """A batch of tasks. `xs`/`ys` are the support set, `xq`/`yq` the query set, all shaped (T, n, ...).

    `info` carries per-task extras that are not inputs (sinusoid amplitude and phase, class names);
    algorithms never read it.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.xs.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.xs, self.ys, self.xq, self.yq

    def slice(self, start: int, stop: int) -> "Episode":
        """Tasks [start, stop) as an Episode (views, no copy)."""
        info = {k: v[start:stop] for k, v in self.info.items()}
        return Episode(self.xs[start:stop], self.ys[start:stop], self.xq[start:stop],
                       self.yq[start:stop], info)

    def chunks(self, size: int) -> list["Episode"]:
        """Split into consecutive pieces of at most `size` tasks (size 0: one piece)."""
        if size <= 0 or size >= self.num_tasks:
            return [self]
        return [self.slice(i, min(i + size, self.num_tasks)) for i in range(0, self.num_tasks, size)]

    def to(self, device) -> "Episode":
        return Episode(*(t.to(device) for t in self.tensors()), dict(self.info))

    @staticmethod
    def cat(parts: list["Episode"]) -> "Episode":
        """Concatenate along the task dimension."""
        keys = parts[0].info.keys()
        info = {k: torch.cat([p.info[k] for p in parts]) for k in keys}
        return Episode(*(torch.cat([getattr(p, f.name) for p in parts])
                         for f in fields(Episode) if f.name != "info"), info)


def episode_range(episodes: "int | range") -> range:
    """The indices of a fixed task list's episodes: `n` means the first n, a range those episodes (a
    worker's share of an evaluation)."""
    return range(episodes) if isinstance(episodes, int) else episodes
