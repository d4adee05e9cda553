"""N-way K-shot image episodes from a dataset directory of shards (`data.path`)."""

from __future__ import annotations

import json

from metadist.data.format import DataError
from metadist.data.manifest import Manifest
from metadist.data.sampler import IndexEpisodes, StreamingEpisodes, resolve_access, stream_shortfall
from metadist.episode import Episode
from metadist.tasks.describe import digest


class FewShotTasks:
    """Training episodes drawn by index from the whole train split (`data.access: index`; a pure function
    of (seed, step, task index)) or streamed from this worker's train shards (`stream`); evaluation
    episodes fixed by (seed, split)."""

    def __init__(self, cfg, rank: int = 0, world: int = 1):
        d = cfg.data
        self.manifest = Manifest(d.path)
        if d.verify != "none":
            self.manifest.verify(d.verify)
        self.cfg = cfg
        self.shape = dict(ways=cfg.task.ways, channels=cfg.model.channels, size=cfg.model.image_size,
                          rotations=tuple(cfg.task.rotations))
        self.access = resolve_access(d.access, d.cache, self.manifest)
        self._fixed: dict[str, IndexEpisodes] = {}
        if self.access == "index":
            self.train = self._fixed["train"] = IndexEpisodes(self.manifest, "train", seed=cfg.seed, cache=d.cache,
                                                              **self.shape)
            self.train.eligible(cfg.task.shots + cfg.task.query)  # enough classes: checked before training
            return
        # Before training, for every worker of the run (the driver builds its tasks first): a worker whose
        # shards cannot form an episode is one line here, not a failure at its first step.
        workers = world if world > 1 else (1 if cfg.runtime.executor == "local" else cfg.runtime.workers)
        problem = stream_shortfall(self.manifest, "train", ways=cfg.task.ways, shots=cfg.task.shots,
                                   query=cfg.task.query, buffer_per_class=d.buffer_per_class, world=workers)
        if problem:
            raise DataError(problem)
        self.train = StreamingEpisodes(self.manifest, "train", seed=cfg.seed, rank=rank, world=world,
                                       buffer_per_class=d.buffer_per_class, **self.shape)

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world: int = 1) -> "FewShotTasks":
        return cls(cfg, rank, world)

    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        return self.train.sample(step, indices, shots, query)

    def fixed(self, split: str, n: int | range, shots: int, query: int) -> Episode:
        if split not in self._fixed:
            self._fixed[split] = IndexEpisodes(self.manifest, split, seed=self.cfg.seed, **self.shape)
        return self._fixed[split].fixed(n, shots, query)

    def state(self) -> dict | None:
        """The stream's position; None when drawing by index (the step is the position)."""
        return self.train.state() if self.access == "stream" else None

    def load_state(self, state: dict) -> None:
        if self.access == "index":
            raise DataError("the checkpoint holds a streaming worker's position, but this run draws its episodes "
                            "by index; resume it with data.access: stream")
        self.train.load_state(state)

    def dataset(self, split: str) -> dict:
        """The dataset's description for the run record: its name, the split, and a digest of the split's
        shards (their SHA-256 from shards.parquet), so two runs on the same files show the same digest."""
        m = self.manifest
        shards = sorted((s, h) for s, h, sp in zip(m.shards["shard"], m.shards["sha256"], m.shards["split"])
                        if sp == split)
        counts = m.class_counts(split)
        profile = {"classes": len(counts), "images": sum(counts.values()), "shards": len(shards),
                   "image_size": m.image_size, "channels": m.channels, "access": self.access}
        return {"name": m.root.rstrip("/").rsplit("/", 1)[-1], "split": split, "digest": digest(shards),
                "source_type": "webdataset", "source": m.root, "profile": json.dumps(profile)}
