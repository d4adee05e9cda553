"""Episodes from shards: a bounded-memory streaming sampler for training, random access for evaluation.

Training (`StreamingEpisodes`): each worker streams its own disjoint subset of a split's shards (shard i
goes to worker i mod W), keeps the last `buffer_per_class` encoded images of every class, and draws an
N-way K-shot + Q-query episode from classes that have at least K + Q buffered. Labels are remapped to
0..N-1 per episode. After each episode it reads N·(K+Q) more samples, so the buffers keep turning over;
a new pass over the shards (in a new order) starts with empty buffers.
Memory is bounded by the buffers (encoded bytes, decoded only when drawn), not by the dataset.
Its position (epoch, samples consumed, RNG state) is small and restorable: a resumed or replaced worker
re-reads the epoch up to that point without decoding and continues the same stream.

`data.cache: decoded` instead decodes the worker's shards once into memory and samples by index.

Evaluation (`fixed_episodes`): a fixed list drawn from (seed, split) through the manifest's tar offsets,
so every run and algorithm is scored on the same episodes.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import webdataset as wds

from metadist.data.format import DataError, check_members, decode_cls, decode_image
from metadist.data.manifest import Manifest
from metadist.config import SPLITS
from metadist.episode import Episode, episode_range


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div_(255.0)


def _episode_from(images_by_class: list[list[np.ndarray]], shots: int) -> tuple:
    xs, ys, xq, yq = [], [], [], []
    for label, imgs in enumerate(images_by_class):
        xs += imgs[:shots]
        xq += imgs[shots:]
        ys += [label] * shots
        yq += [label] * (len(imgs) - shots)
    return (_to_float(np.stack(xs)), torch.tensor(ys), _to_float(np.stack(xq)), torch.tensor(yq))


def _stack(parts: list[tuple]) -> Episode:
    return Episode(*(torch.stack([p[i] for p in parts]) for i in range(4)))


class StreamingEpisodes:
    """One worker's stream of training episodes over its shards of `split`."""

    def __init__(self, manifest: Manifest, split: str, *, ways: int, channels: int, size: int, seed: int,
                 rank: int = 0, world: int = 1, buffer_per_class: int = 64, cache: str = "stream"):
        shards = manifest.split_shards(split)
        mine = shards[rank::world]
        if not mine:
            raise DataError(f"worker {rank} of {world} gets none of the {len(shards)} {split} shards of "
                            f"{manifest.root}: use fewer workers or write smaller shards")
        self.manifest, self.split, self.urls = manifest, split, [manifest.url(s) for s in mine]
        self.ways, self.channels, self.size = ways, channels, size
        self.seed, self.rank, self.buffer_per_class, self.cache = seed, rank, buffer_per_class, cache
        self.rng = np.random.default_rng([seed, rank, 7])
        self.epoch, self.consumed = 0, 0
        self.buffers: dict[int, deque] = {}
        self._it = None
        self._decoded: dict[int, np.ndarray] | None = None

    # -- the stream -----------------------------------------------------------------------------
    def _samples(self, epoch: int):
        order = list(self.urls)
        np.random.default_rng([self.seed, self.rank, epoch]).shuffle(order)
        return _read(order)

    def _pull(self, n: int) -> None:
        """Move n samples from the stream into the class buffers (a new epoch starts when it ends)."""
        for _ in range(n):
            if self._it is None:
                self._it = self._samples(self.epoch)
            try:
                cls, data = next(self._it)
            except StopIteration:
                # A new pass starts with empty buffers, so that the buffers are a function of (epoch,
                # samples consumed) alone and a restored stream rebuilds them exactly.
                self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
                self.buffers.clear()
                continue
            self.consumed += 1
            self.buffers.setdefault(cls, deque(maxlen=self.buffer_per_class)).append(data)

    def _eligible(self, need: int) -> list[int]:
        return sorted(c for c, b in self.buffers.items() if len(b) >= need)

    def _fill_until(self, need: int) -> list[int]:
        start_epoch = self.epoch
        while len(eligible := self._eligible(need)) < self.ways:
            if self.epoch > start_epoch + 1:
                raise DataError(f"worker {self.rank}: its {self.split} shards hold only {len(eligible)} classes "
                                f"with at least {need} images (K + Q); an episode needs {self.ways}")
            self._pull(64)
        return eligible

    # -- episodes -------------------------------------------------------------------------------
    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        """len(indices) training episodes, the next ones of this worker's stream."""
        return _stack([self._episode(shots, query) for _ in indices])

    def _episode(self, shots: int, query: int) -> tuple:
        need = shots + query
        if self.cache == "decoded":
            return self._episode_decoded(shots, need)
        eligible = self._fill_until(need)
        classes = self.rng.choice(eligible, self.ways, replace=False)
        images = []
        for c in classes:
            buf = self.buffers[int(c)]
            pick = self.rng.choice(len(buf), need, replace=False)
            images.append([self._decode(buf[i]) for i in pick])
        self._pull(self.ways * need)  # keep the buffers turning over
        return _episode_from(images, shots)

    def _decode(self, data: bytes) -> np.ndarray:
        try:
            return decode_image(data, self.channels, self.size)
        except DataError as err:
            raise DataError(f"{self.split} shards of {self.manifest.root}: {err}") from None

    def _episode_decoded(self, shots: int, need: int) -> tuple:
        if self._decoded is None:
            per_class: dict[int, list] = {}
            for cls, data in _read(self.urls):
                per_class.setdefault(cls, []).append(self._decode(data))
            self._decoded = {c: np.stack(v) for c, v in per_class.items()}
        eligible = sorted(c for c, v in self._decoded.items() if len(v) >= need)
        if len(eligible) < self.ways:
            raise DataError(f"worker {self.rank}: only {len(eligible)} classes with at least {need} images")
        classes = self.rng.choice(eligible, self.ways, replace=False)
        images = [list(self._decoded[int(c)][self.rng.choice(len(self._decoded[int(c)]), need, replace=False)])
                  for c in classes]
        return _episode_from(images, shots)

    # -- position -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "rng": self.rng.bit_generator.state,
                "rank": self.rank}

    def load_state(self, state: dict) -> None:
        """Continue the stream where `state` was taken: re-read this epoch up to it (no decoding)."""
        self.buffers.clear()
        self.epoch, self.consumed, self._it = state["epoch"], 0, None
        if self.cache != "decoded":
            self._it = self._samples(self.epoch)
            for _ in range(state["consumed"]):
                cls, data = next(self._it)
                self.consumed += 1
                self.buffers.setdefault(cls, deque(maxlen=self.buffer_per_class)).append(data)
        self.rng.bit_generator.state = state["rng"]


def _read(urls: list[str]):
    """(class id, image bytes) of every sample of the shards, in order; nothing else is decoded."""
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=_named_error))
    for sample in pipeline:
        ext = check_members(sample, sample.get("__url__", "shard"))
        yield decode_cls(sample["cls"]), sample[ext]


def _named_error(exn: Exception) -> bool:
    # webdataset appends the shard URL to the exception's args; name it in one line.
    if isinstance(exn, DataError):
        raise exn
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or a.endswith(".tar"))), "a shard")
    raise DataError(f"shard {url} cannot be read ({type(exn).__name__}: {exn.args[0] if exn.args else exn}); "
                    f"it may be truncated: check it with `metadist data verify`") from None


def fixed_episodes(manifest: Manifest, split: str, n: int | range, *, ways: int, shots: int, query: int, channels: int,
                   size: int, seed: int) -> Episode:
    """The fixed evaluation list of `split` (its first n episodes, or those of range n): episode e is a
    pure function of (seed, split, e)."""
    classes = manifest.classes(split)
    need = shots + query
    eligible = sorted(c for c, rows in classes.items() if len(rows) >= need)
    if len(eligible) < ways:
        raise DataError(f"{manifest.root}: the {split} split has {len(eligible)} classes with at least {need} "
                        f"images; {ways}-way episodes need {ways}")
    parts = []
    split_code = SPLITS[split]
    for e in episode_range(n):
        rng = np.random.default_rng([seed, split_code, e, 11])
        chosen = rng.choice(eligible, ways, replace=False)
        rows = [rng.choice(classes[int(c)], need, replace=False) for c in chosen]
        data = manifest.read(np.concatenate(rows))
        imgs = [decode_image(d, channels, size) for d in data]
        parts.append(_episode_from([imgs[i * need:(i + 1) * need] for i in range(ways)], shots))
    return _stack(parts)
