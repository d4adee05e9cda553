"""Episodes from shards: training episodes by index or streamed, evaluation episodes by index.

Training episodes reach the images in one of two ways (`data.access`):

- `index` (`IndexEpisodes`): task t of outer step s draws its classes and images from the whole train
  split through the manifest's tar offsets, as a pure function of (seed, s, t), exactly as evaluation
  episodes are drawn. Any worker can draw any task, so the episodes do not depend on the worker count
  and a replaced worker recomputes the same tasks; there is no position to save. Local shards are
  memory-mapped (the node's page cache holds them once, for all its workers); remote shards are read
  into each worker's memory. `data.cache: decoded` also keeps each image decoded after its first use.
- `stream` (`StreamingEpisodes`), for datasets larger than a node's disk or memory: each worker reads its
  own disjoint subset of the split's shards (shard i to worker i mod W) in sequence, keeps the last
  `buffer_per_class` encoded images of every class, and draws an N-way K-shot + Q-query episode from the
  classes that have at least K + Q buffered. After each episode it reads N·(K+Q) more samples, so the
  buffers keep turning over; a new pass over the shards (in a new order) starts with empty buffers.
  A worker therefore sees about 1/W of every class, and which episodes it draws depends on W. Memory is
  bounded by the buffers (encoded bytes) and one shard. Its position (epoch, samples consumed, RNG
  state) is small and restorable: a resumed or replaced worker continues the same stream.
  `stream_shortfall` checks before training that every worker's shards can form an episode.

Both read an image's bytes by its manifest offset (no tar parsing; no member other than the image is
ever read), decode a meta-batch with Pillow's C decoders straight into one uint8 array
(`format.decode_into`) and turn it into float tensors with a few whole-batch operations: per image,
little but the decode itself is left in Python's hands.

Evaluation (`fixed_episodes`): a fixed list drawn by index from (seed, split), so every run and algorithm
is scored on the same episodes.

Rotations (`task.rotations`, Omniglot's augmentation): each class of each episode, training and
evaluation alike, is turned by a multiple of 90 degrees drawn from the allowed ones, the same for all
its images, as the MAML reference code does. A rotated character so acts as a new class, two rotations
of one character never meet in an episode (its classes are drawn without replacement), and rotations
stay within their split. The turn is drawn after the episode's images, from the same generator, so with
one allowed rotation the draws are those of a run without the option.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from metadist.config import SPLITS
from metadist.data.format import DataError, decode_into, pil_formats, pixel_batch
from metadist.data.manifest import Manifest
from metadist.episode import Episode, episode_range

INDEX_AUTO_BYTES = 2 * 1024 ** 3
"""`auto` draws remote datasets by index when their train shards total at most this (each worker then
holds them in memory); local datasets always (the page cache holds them, or they are read from disk)."""
# The last seed word of a draw: training and evaluation draws can never coincide.
_TRAIN_TAG, _EVAL_TAG = 13, 11


def resolve_access(access: str, cache: str, manifest: Manifest, split: str = "train") -> str:
    """`index` or `stream`: `auto` is `index` for a local dataset, a decoded cache, or a remote split of
    at most INDEX_AUTO_BYTES; `stream` otherwise."""
    if access != "auto":
        return access
    if cache == "decoded" or manifest.local or manifest.split_bytes(split) <= INDEX_AUTO_BYTES:
        return "index"
    return "stream"


def _episodes(pixels: np.ndarray, tasks: int, ways: int, need: int, shots: int) -> Episode:
    """(tasks·ways·need, C, H, W) uint8 pixels in (task, class, image) order -> an Episode whose support
    set is the first `shots` images of each class; labels are 0..ways-1 in class order."""
    c, h, w = pixels.shape[1:]
    t = torch.from_numpy(pixels).view(tasks, ways, need, c, h, w)

    def part(x: torch.Tensor, n: int) -> torch.Tensor:
        # Cast, then scaled in place, into memory allocated by numpy, which asks Linux for huge pages: a
        # fresh torch tensor of a meta-batch's size costs more in page faults than the conversion. (A
        # cast inside torch.div(..., out=) runs 4 times slower.)
        out = torch.from_numpy(np.empty((tasks, ways, n, c, h, w), np.float32))
        return out.copy_(x).div_(255.0).view(tasks, ways * n, c, h, w)

    labels = torch.arange(ways)
    return Episode(part(t[:, :, :shots], shots), labels.repeat_interleave(shots).repeat(tasks, 1),
                   part(t[:, :, shots:], need - shots), labels.repeat_interleave(need - shots).repeat(tasks, 1))


def rotate(pixels: np.ndarray, quarters: np.ndarray, ways: int, need: int) -> np.ndarray:
    """Turn each class of each episode by its own multiple of 90 degrees (counter-clockwise):
    `pixels` (tasks·ways·need, C, H, W) in (task, class, image) order, `quarters` (tasks, ways)."""
    if not quarters.any():
        return pixels
    blocks = pixels.reshape(len(quarters), ways, need, *pixels.shape[1:])
    out = np.empty_like(blocks)
    for t, w in np.ndindex(*quarters.shape):
        out[t, w] = np.rot90(blocks[t, w], int(quarters[t, w]), axes=(-2, -1))
    return out.reshape(pixels.shape)


def draw_quarters(rng: np.random.Generator, rotations: tuple[int, ...], ways: int) -> np.ndarray:
    """(ways,) quarter turns, one per class of an episode, drawn uniformly from `rotations` (degrees);
    nothing is drawn when there is no choice, so those episodes keep their draws as before."""
    if len(rotations) == 1:
        return np.full(ways, rotations[0] // 90, dtype=np.int64)
    return np.asarray(rotations, dtype=np.int64)[rng.integers(0, len(rotations), ways)] // 90


def draw_rows(rng: np.random.Generator, classes: dict[int, np.ndarray], eligible: np.ndarray, ways: int,
              need: int) -> np.ndarray:
    """(ways, need) manifest rows of one episode: `ways` classes of `eligible`, `need` images of each."""
    chosen = rng.choice(eligible, ways, replace=False)
    return np.stack([rng.choice(classes[int(c)], need, replace=False) for c in chosen])


class Pixels:
    """Decodes a split's images into uint8 arrays (n, C, H, W); with cache `decoded`, each image once."""

    def __init__(self, manifest: Manifest, split: str, channels: int, size: int, cache: str = "encoded"):
        self.manifest, self.channels, self.size = manifest, channels, size
        rows = manifest.rows(split)
        self.formats = pil_formats(np.unique(manifest.samples["ext"][rows]))
        self.where = f"{split} shards of {manifest.root}"
        self._cache = None
        if cache == "decoded":
            self._rows = rows
            self._slot = np.full(len(manifest.offset), -1, dtype=np.int64)
            self._slot[rows] = np.arange(len(rows))
            # np.empty commits no memory until an image is decoded into its slot.
            self._cache = np.empty((len(rows), channels, size, size), np.uint8)
            self._done = np.zeros(len(rows), dtype=bool)

    def decode(self, blobs: list) -> np.ndarray:
        hwc = decode_into(pixel_batch(len(blobs), self.size, self.channels), blobs, self.where, self.formats)
        if self.channels == 1:
            return hwc.reshape(len(blobs), 1, self.size, self.size)  # the same bytes: no copy
        # Reordered while still uint8, a quarter of the float tensor's bytes (torch's strided copy runs
        # twice as fast as numpy's here).
        out = np.empty((len(blobs), self.channels, self.size, self.size), np.uint8)
        torch.from_numpy(out).copy_(torch.from_numpy(hwc).permute(0, 3, 1, 2))
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The pixels of manifest rows, in order."""
        if self._cache is None:
            return self.decode(self.manifest.read(rows))
        slots = self._slot[rows]
        todo = np.unique(slots[~self._done[slots]])
        if len(todo):
            self._cache[todo] = self.decode(self.manifest.read(self._rows[todo]))
            self._done[todo] = True
        return self._cache[slots]


class IndexEpisodes:
    """Episodes of `split` drawn by tar offset: each a pure function of its seed words."""

    def __init__(self, manifest: Manifest, split: str, *, ways: int, channels: int, size: int, seed: int,
                 cache: str = "encoded", rotations: tuple[int, ...] = (0,)):
        self.manifest, self.split, self.ways, self.seed = manifest, split, ways, seed
        self.rotations = tuple(rotations)
        self.classes = manifest.classes(split)
        self.pixels = Pixels(manifest, split, channels, size, cache)
        self._eligible: dict[int, np.ndarray] = {}

    def eligible(self, need: int) -> np.ndarray:
        """The split's classes with at least `need` images (DataError if fewer than `ways`)."""
        if need not in self._eligible:
            e = np.asarray(sorted(c for c, rows in self.classes.items() if len(rows) >= need), dtype=np.int64)
            if len(e) < self.ways:
                raise DataError(f"{self.manifest.root}: the {self.split} split has {len(e)} classes with at least "
                                f"{need} images; {self.ways}-way episodes need {self.ways}")
            self._eligible[need] = e
        return self._eligible[need]

    def episodes(self, keys: list[list[int]], shots: int, query: int) -> Episode:
        """One episode per key (its generator's seed words), in order."""
        need = shots + query
        eligible = self.eligible(need)
        rows, quarters = [], []
        for k in keys:
            rng = np.random.default_rng(k)
            rows.append(draw_rows(rng, self.classes, eligible, self.ways, need).ravel())
            quarters.append(draw_quarters(rng, self.rotations, self.ways))  # after the rows: they stay as they were
        rows = np.concatenate(rows) if keys else np.zeros(0, dtype=np.int64)
        quarters = np.stack(quarters) if keys else np.zeros((0, self.ways), dtype=np.int64)
        return _episodes(rotate(self.pixels.rows(rows), quarters, self.ways, need), len(keys), self.ways, need, shots)

    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        """Training tasks `indices` (indices within the meta-batch) of outer step `step`."""
        code = SPLITS[self.split]
        return self.episodes([[self.seed, code, step, int(t), _TRAIN_TAG] for t in indices], shots, query)

    def fixed(self, n: int | range, shots: int, query: int) -> Episode:
        """The fixed evaluation list (its first n episodes, or those of range n): episode e is a pure
        function of (seed, split, e)."""
        code = SPLITS[self.split]
        return self.episodes([[self.seed, code, e, _EVAL_TAG] for e in episode_range(n)], shots, query)


def fixed_episodes(manifest: Manifest, split: str, n: int | range, *, ways: int, shots: int, query: int,
                   channels: int, size: int, seed: int, rotations: tuple[int, ...] = (0,)) -> Episode:
    """The fixed evaluation list of `split` (its first n episodes, or those of range n): episode e is a
    pure function of (seed, split, e)."""
    return IndexEpisodes(manifest, split, ways=ways, channels=channels, size=size, seed=seed,
                         rotations=rotations).fixed(n, shots, query)


def stream_shortfall(manifest: Manifest, split: str, *, ways: int, shots: int, query: int,
                     buffer_per_class: int, world: int) -> str | None:
    """Why one of `world` streaming workers could never form an episode (one line naming the numbers and
    the remedy), or None. Reads the manifest only."""
    need = shots + query
    if need > buffer_per_class:
        return (f"data.buffer_per_class={buffer_per_class} keeps fewer images of a class than an episode takes "
                f"from it (K + Q = {shots} + {query} = {need}); raise it to at least {need}, or use "
                f"data.access: index")
    shards = manifest.split_shards(split)
    if len(shards) < world:
        return (f"data.access=stream: {world} workers but {len(shards)} {split} shard(s) in {manifest.root}: "
                f"worker {len(shards)} would get none; use data.access: index, fewer workers, or smaller shards "
                f"(--shard-mb)")
    rank_of_shard = np.full(len(manifest.shards["shard"]), -1, dtype=np.int64)
    rank_of_shard[[manifest.position[s] for s in shards]] = np.arange(len(shards)) % world
    rows = manifest.rows(split)
    classes = int(manifest.samples["class_id"].max()) + 1
    # Images per (worker, class), as one count over worker·classes + class.
    keys, counts = np.unique(rank_of_shard[manifest.shard_index[rows]] * classes + manifest.samples["class_id"][rows],
                             return_counts=True)
    enough = np.bincount(keys[counts >= need] // classes, minlength=world)
    worst = int(np.argmin(enough))
    if enough[worst] >= ways:
        return None
    return (f"data.access=stream: worker {worst} of {world} reads {len(shards[worst::world])} of the {len(shards)} "
            f"{split} shards, which hold only {enough[worst]} classes with at least {need} images "
            f"(K + Q = {shots} + {query}); a {ways}-way episode needs {ways}. Use data.access: index (every "
            f"worker then draws from the whole split) or fewer workers")


class StreamingEpisodes:
    """One worker's stream of training episodes over its shards of `split`."""

    def __init__(self, manifest: Manifest, split: str, *, ways: int, channels: int, size: int, seed: int,
                 rank: int = 0, world: int = 1, buffer_per_class: int = 64, rotations: tuple[int, ...] = (0,)):
        shards = manifest.split_shards(split)
        mine = shards[rank::world]
        if not mine:
            raise DataError(f"worker {rank} of {world} gets none of the {len(shards)} {split} shards of "
                            f"{manifest.root}: use fewer workers, write smaller shards, or use data.access: index")
        self.manifest, self.split, self.shards = manifest, split, mine
        self.ways, self.seed, self.rank, self.buffer_per_class = ways, seed, rank, buffer_per_class
        self.rotations = tuple(rotations)
        self._index = [manifest.position[s] for s in mine]
        self._class = manifest.samples["class_id"].astype(np.int64)
        self.pixels = Pixels(manifest, split, channels, size)
        self.rng = np.random.default_rng([seed, rank, 7])
        self.epoch, self.consumed = 0, 0
        self.buffers: dict[int, deque] = {}
        self._need, self._ready = 0, set()  # the classes with at least _need images buffered
        self._seq: np.ndarray | None = None
        self._held = (-1, b"")  # the shard being read: (its index, its bytes)

    # -- the stream -----------------------------------------------------------------------------
    def _sequence(self, epoch: int) -> np.ndarray:
        """The manifest rows of one pass: this worker's shards in a per-epoch order, each front to back."""
        order = list(self._index)
        np.random.default_rng([self.seed, self.rank, epoch]).shuffle(order)
        return np.concatenate([self.manifest.shard_rows(i) for i in order])  # each shard front to back

    def _store(self, rows: np.ndarray) -> None:
        """Append the bytes of `rows` (in stream order) to their classes' buffers."""
        m, buffers, ready, need = self.manifest, self.buffers, self._ready, self._need
        # A remote shard's bytes are held here between calls; a local shard's map is asked for again, as
        # the manifest may have closed it since (it keeps at most _OPEN maps).
        held, buf = self._held if not m.local else (-1, b"")
        for s, o, n, c in zip(m.shard_index[rows].tolist(), m.offset[rows].tolist(), m.size[rows].tolist(),
                              self._class[rows].tolist()):
            if s != held:
                held, buf = s, m.buffer(s, keep=False)
                if not m.local:
                    self._held = (held, buf)
            b = buffers.get(c)
            if b is None:
                b = buffers[c] = deque(maxlen=self.buffer_per_class)
            b.append(buf[o:o + n])
            if len(b) == need:
                ready.add(c)

    def _pull(self, n: int) -> None:
        """Move n samples from the stream into the class buffers (a new pass starts when one ends)."""
        while n > 0:
            if self._seq is None:
                self._seq = self._sequence(self.epoch)
            rows = self._seq[self.consumed:self.consumed + n]
            if not len(rows):
                # A new pass starts with empty buffers, so that the buffers are a function of (epoch,
                # samples consumed) alone and a restored stream rebuilds them exactly.
                self.epoch, self.consumed, self._seq = self.epoch + 1, 0, None
                self.buffers.clear()
                self._ready.clear()
                continue
            self._store(rows)
            self.consumed += len(rows)
            n -= len(rows)

    def _fill_until(self, need: int) -> list[int]:
        if need != self._need:  # the classes with `need` buffered, kept up to date by _store
            self._need, self._ready = need, {c for c, b in self.buffers.items() if len(b) >= need}
        start_epoch = self.epoch
        while len(self._ready) < self.ways:
            if self.epoch > start_epoch + 1:
                raise DataError(f"worker {self.rank}: its {self.split} shards hold only {len(self._ready)} "
                                f"classes with at least {need} images (K + Q); an episode needs {self.ways}")
            self._pull(64)
        return sorted(self._ready)

    # -- episodes -------------------------------------------------------------------------------
    def sample(self, step: int, indices, shots: int, query: int) -> Episode:
        """len(indices) training episodes, the next ones of this worker's stream."""
        need = shots + query
        blobs: list = []
        quarters = np.zeros((len(indices), self.ways), dtype=np.int64)
        for t in range(len(indices)):
            eligible = self._fill_until(need)
            for c in self.rng.choice(eligible, self.ways, replace=False):
                buf = self.buffers[int(c)]
                blobs += [buf[i] for i in self.rng.choice(len(buf), need, replace=False).tolist()]
            quarters[t] = draw_quarters(self.rng, self.rotations, self.ways)
            self._pull(self.ways * need)  # keep the buffers turning over
        return _episodes(rotate(self.pixels.decode(blobs), quarters, self.ways, need), len(indices), self.ways,
                         need, shots)

    # -- position -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "rng": self.rng.bit_generator.state,
                "rank": self.rank}

    def load_state(self, state: dict) -> None:
        """Continue the stream where `state` was taken: rebuild the buffers from the manifest, reading
        only the images that are still in them."""
        self.buffers.clear()
        self._need, self._ready = 0, set()
        self.epoch, self.consumed, self._seq = state["epoch"], state["consumed"], None
        self._seq = self._sequence(self.epoch)
        last: dict[int, deque] = {}
        done = self._seq[:self.consumed]
        for i, c in enumerate(self._class[done].tolist()):
            q = last.get(c)
            if q is None:
                q = last[c] = deque(maxlen=self.buffer_per_class)
            q.append(i)
        kept = np.sort(np.concatenate([np.asarray(q, dtype=np.int64) for q in last.values()])) if last else []
        self._store(done[kept])
        self.rng.bit_generator.state = state["rng"]
