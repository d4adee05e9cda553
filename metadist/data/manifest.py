"""The Parquet manifest of a dataset directory, and random access to its images by tar offset."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import fsspec
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
        self.samples = {k: np.asarray(table.column(k).to_pylist()) for k in table.column_names}
        self.shards = {k: shards.column(k).to_pylist() for k in shards.column_names}

    def url(self, shard: str) -> str:
        return f"{self.root}/{shard}"

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

    def read(self, rows: np.ndarray) -> list[bytes]:
        """The stored image bytes of manifest rows, read by offset (one open per shard)."""
        out: list[bytes | None] = [None] * len(rows)
        shards = self.samples["shard"][rows]
        for shard in np.unique(shards):
            with fsspec.open(self.url(shard), "rb") as fh:
                for i in np.flatnonzero(shards == shard):
                    r = rows[i]
                    fh.seek(int(self.samples["offset"][r]))
                    out[i] = fh.read(int(self.samples["size"][r]))
        return out
