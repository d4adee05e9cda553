"""N-way K-shot image episodes from a dataset directory of shards (`data.path`)."""

from __future__ import annotations

import json

from metadist.data.manifest import Manifest
from metadist.data.sampler import StreamingEpisodes, fixed_episodes
from metadist.episode import Episode
from metadist.tasks.describe import digest


class FewShotTasks:
    """Training episodes streamed from this worker's train shards; evaluation episodes fixed by (seed, split)."""

    def __init__(self, cfg, rank: int = 0, world: int = 1):
        d = cfg.data
        self.manifest = Manifest(d.path)
        if d.verify != "none":
            self.manifest.verify(d.verify)
        self.cfg = cfg
        self.shape = dict(ways=cfg.task.ways, channels=cfg.model.channels, size=cfg.model.image_size)
        self.stream = StreamingEpisodes(self.manifest, "train", seed=cfg.seed, rank=rank, world=world,
                                        buffer_per_class=d.buffer_per_class, cache=d.cache, **self.shape)

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world: int = 1) -> "FewShotTasks":
        return cls(cfg, rank, world)

    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        return self.stream.sample(step, indices, shots, query)

    def fixed(self, split: str, n: int | range, shots: int, query: int) -> Episode:
        return fixed_episodes(self.manifest, split, n, shots=shots, query=query, seed=self.cfg.seed, **self.shape)

    def state(self) -> dict:
        return self.stream.state()

    def load_state(self, state: dict) -> None:
        self.stream.load_state(state)

    def dataset(self, split: str) -> dict:
        """The dataset's description for the run record: its name, the split, and a digest of the split's
        shards (their SHA-256 from shards.parquet), so two runs on the same files show the same digest."""
        m = self.manifest
        shards = sorted((s, h) for s, h, sp in zip(m.shards["shard"], m.shards["sha256"], m.shards["split"])
                        if sp == split)
        counts = m.class_counts(split)
        profile = {"classes": len(counts), "images": sum(counts.values()), "shards": len(shards),
                   "image_size": m.image_size, "channels": m.channels}
        return {"name": m.root.rstrip("/").rsplit("/", 1)[-1], "split": split, "digest": digest(shards),
                "source_type": "webdataset", "source": m.root, "profile": json.dumps(profile)}
