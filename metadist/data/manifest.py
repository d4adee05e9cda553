"""The Parquet manifest of a dataset directory, and random access to its images by tar offset.

A local shard is memory-mapped once and sliced by offset: the OS page cache holds it, once per node for
all the workers there, and a read is a slice, not an open and a seek. A remote shard (an fsspec URL) is
read whole on first use and kept in the process's memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow.parquet as pq

from metadist.data.format import FORMAT_VERSION, DataError


class Manifest:
    """Samples and shards of a dataset at `root` (a local directory or an fsspec URL)."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        try:
            with fsspec.open(f"{self.root}/manifest.parquet", "rb") as fh:
                table = pq.read_table(fh)
            with fsspec.open(f"{self.root}/shards.parquet", "rb") as fh:
                shards = pq.read_table(fh)
        except FileNotFoundError:
            raise DataError(f"data.path={self.root!r}: no manifest.parquet/shards.parquet there; write one with "
                            f"`metadist data synth` or `metadist data convert`") from None
        meta = table.schema.metadata or {}
        if meta.get(b"metadist_format") != str(FORMAT_VERSION).encode():
            raise DataError(f"{self.root}/manifest.parquet: not a metadist manifest of format {FORMAT_VERSION}")
        self.image_size = int(meta[b"image_size"])
        self.channels = int(meta[b"channels"])
        # Where the data came from (the converter's format and, for Omniglot, its split policy and sizes).
        self.source = json.loads(meta.get(b"source", b"{}"))
        self.samples = {k: np.asarray(table.column(k).to_pylist()) for k in table.column_names}
        self.shards = {k: shards.column(k).to_pylist() for k in shards.column_names}
        self.fs, self._path = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        # Per row: the shard's index in self.shards, and the byte range, as plain arrays for fast reads.
        names, inverse = np.unique(self.samples["shard"], return_inverse=True)
        self.position = {name: i for i, name in enumerate(self.shards["shard"])}  # shard name -> index
        self.shard_index = np.asarray([self.position.get(n, -1) for n in names.tolist()], dtype=np.int64)[inverse]
        if (self.shard_index < 0).any():
            raise DataError(f"{self.root}/manifest.parquet lists samples in shards that shards.parquet does not "
                            f"have; write the manifest again (`metadist data convert`)")
        self.offset = self.samples["offset"].astype(np.int64)
        self.size = self.samples["size"].astype(np.int64)
        self._end = np.zeros(len(self.shards["shard"]), dtype=np.int64)  # each shard's last sample's end
        np.maximum.at(self._end, self.shard_index, self.offset + self.size)
        self._buffers: OrderedDict[int, object] = OrderedDict()

    def url(self, shard: str) -> str:
        return f"{self.root}/{shard}"

    def split_bytes(self, split: str) -> int:
        """Total size of `split`'s shard files, from shards.parquet (no file is opened)."""
        return int(sum(b for b, sp in zip(self.shards["bytes"], self.shards["split"]) if sp == split))

    def split_shards(self, split: str) -> list[str]:
        return [s for s, sp in zip(self.shards["shard"], self.shards["split"]) if sp == split]

    @cached_property
    def _by_split(self) -> dict[str, np.ndarray]:
        return {sp: np.flatnonzero(self.samples["split"] == sp) for sp in np.unique(self.samples["split"])}

    def rows(self, split: str) -> np.ndarray:
        """Row indices of `split`'s samples, in manifest order."""
        if split not in self._by_split:
            raise DataError(f"{self.root}: the dataset has no {split!r} split (has {sorted(self._by_split)})")
        return self._by_split[split]

    def classes(self, split: str) -> dict[int, np.ndarray]:
        """class id -> row indices of its samples, for `split`."""
        rows = self.rows(split)
        ids = self.samples["class_id"][rows]
        return {int(c): rows[ids == c] for c in np.unique(ids)}

    def class_counts(self, split: str) -> dict[str, int]:
        rows = self.rows(split)
        names, counts = np.unique(self.samples["class_name"][rows], return_counts=True)
        return dict(zip(names.tolist(), counts.tolist()))

    def verify(self, level: str = "size") -> None:
        """Check every shard against the manifest: `size` (cheap) or `hash` (reads every byte)."""
        fs, _ = fsspec.core.url_to_fs(self.root)
        for shard, size, digest in zip(self.shards["shard"], self.shards["bytes"], self.shards["sha256"]):
            url = self.url(shard)
            try:
                actual = fs.size(url)
            except FileNotFoundError:
                raise DataError(f"shard {url} is listed in the manifest but missing") from None
            if actual != size:
                raise DataError(f"shard {url} has {actual} bytes, the manifest says {size}: truncated or changed")
            if level == "hash":
                h = hashlib.sha256()
                with fs.open(url, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
                if h.hexdigest() != digest:
                    raise DataError(f"shard {url}: content hash differs from the manifest's; the shard changed")

    def shard_rows(self, index: int) -> np.ndarray:
        """The rows of shard `index` (of self.shards), in file order."""
        order, starts = self._by_shard
        return order[starts[index]:starts[index + 1]]

    @cached_property
    def _by_shard(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((self.offset, self.shard_index))
        return order, np.searchsorted(self.shard_index[order], np.arange(len(self.shards["shard"]) + 1))

    def read(self, rows: np.ndarray, keep: bool = True) -> list[bytes]:
        """The stored image bytes of manifest rows, sliced by tar offset out of each shard's buffer. With
        keep=False a remote shard is not kept after this call (a stream that moves on)."""
        shard_index = self.shard_index[rows].tolist()
        offset, size = self.offset[rows].tolist(), self.size[rows].tolist()
        out, current, buf = [], -1, None
        for s, o, n in zip(shard_index, offset, size):
            if s != current:
                current, buf = s, self.buffer(s, keep)
            out.append(buf[o:o + n])
        return out

    def buffer(self, index: int, keep: bool = True):
        """Shard `index` (of self.shards) as a bytes-like object: memory-mapped if local, else read whole.
        At most _OPEN local maps are held (each holds a file descriptor)."""
        buf = self._buffers.get(index)
        if buf is not None:
            self._buffers.move_to_end(index)
            return buf
        name = self.shards["shard"][index]
        url = self.url(name)
        try:
            if self.local:
                with open(f"{self._path}/{name}", "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    buf = mmap.mmap(fh.fileno(), 0, flags=_MAP_FLAGS, prot=mmap.PROT_READ) if size else b""
            else:
                buf = self.fs.cat_file(url)
        except FileNotFoundError:
            raise DataError(f"shard {url} is listed in the manifest but missing") from None
        end = int(self._end[index])
        if len(buf) < end:
            raise DataError(f"shard {url} has {len(buf)} bytes but the manifest has samples up to byte {end}: "
                            f"truncated or changed; check it with `metadist data verify`")
        if keep or self.local:
            self._buffers[index] = buf
            while self.local and len(self._buffers) > _OPEN:
                self._buffers.popitem(last=False)[1].close()
        return buf


_OPEN = 256  # local shards mapped at once: well under the usual limit of 1024 open files
# MAP_POPULATE maps every page of a shard when it is opened (from the page cache, or read ahead from
# disk), instead of one page fault per page at first touch: random access then costs no faults.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
