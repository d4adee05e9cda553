"""Writing a dataset directory: shuffled WebDataset shards per split, then the Parquet manifest.

Converters and `synth` describe each image as (class name, source) and pass an `encode` function that
turns a source into stored bytes (resizing, grayscale); encoding runs in a process pool, in a fixed
order, so the shards are the same for the same input and seed. Samples are shuffled within a split
before writing: a streaming reader then meets many classes in every part of every shard.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from rich.progress import Progress

from metadist.data.format import FORMAT_VERSION, IMAGE_EXTS, SHARD_BYTES, DataError
from metadist.config import SPLITS


@dataclass
class SplitReport:
    """What happened to one split: counts per class written, and what was skipped and why."""
    split: str
    found: Counter = field(default_factory=Counter)
    written: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)  # (class, source, reason)


def _encode_one(args):
    encode, cls, source = args
    try:
        data, ext = encode(source)
        return cls, source, data, ext, None
    except DataError as err:  # a corrupt or unreadable image: counted and reported, not fatal
        return cls, source, None, None, str(err)


def write_split(out: Path, split: str, items: list[tuple[str, object]], encode: Callable, *, seed: int = 0,
                shard_bytes: float = SHARD_BYTES, workers: int = 1, progress: Progress | None = None) -> SplitReport:
    """Encode `items` ((class name, source) pairs) and write them as `<split>-NNNNN.tar` shards."""
    report = SplitReport(split)
    classes = sorted({c for c, _ in items})
    ids = {c: i for i, c in enumerate(classes)}
    report.found.update(c for c, _ in items)
    order = list(items)
    random.Random(f"{seed}/{split}").shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    task = progress.add_task(f"{split}: encoding", total=len(order)) if progress else None
    pattern = str(out / f"{split}-%05d.tar")
    jobs = ((encode, c, s) for c, s in order)
    # ShardWriter's own size limit counts payload bytes only; for small images the tar headers and
    # padding double that, so the target is kept here, on the bytes the tar file will really hold.
    written = 0
    with wds.ShardWriter(pattern, maxsize=float("inf"), maxcount=10 ** 9, verbose=0) as sink:
        pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_encode_one, jobs, chunksize=16) if pool else map(_encode_one, jobs)
            for n, (cls, source, data, ext, error) in enumerate(results):
                if error is None:
                    sample = {"__key__": f"{split}_{n:07d}", ext: data, "cls": str(ids[cls]).encode(),
                              "json": json.dumps({"name": cls, "split": split}).encode()}
                    size = sum(_tar_bytes(v) for k, v in sample.items() if k != "__key__")
                    if written and written + size > shard_bytes:
                        sink.next_stream()
                        written = 0
                    sink.write(sample)
                    written += size
                    report.written[cls] += 1
                else:
                    report.skipped.append((cls, str(source), error))
                if progress:
                    progress.advance(task)
        finally:
            if pool:
                pool.close()
                pool.join()
    return report


def _tar_bytes(data: bytes) -> int:
    """Bytes a member takes in webdataset's PAX tar: three 512-byte header blocks (pax header, pax
    records, ustar header) and the data padded to 512."""
    return 1536 + -(-len(data) // 512) * 512


def index_shards(out: Path, image_size: int, channels: int, source: dict | None = None) -> tuple[Path, Path]:
    """Read every shard back and write `manifest.parquet` (a row per sample) and `shards.parquet`;
    `source` (where the data came from: format, split policy) is kept in the manifest's metadata."""
    rows = {k: [] for k in ("split", "class_id", "class_name", "shard", "key", "ext", "offset", "size")}
    shard_rows = {k: [] for k in ("shard", "split", "bytes", "samples", "sha256")}
    for shard in sorted(out.glob("*.tar")):
        split = shard.name.rsplit("-", 1)[0]
        if split not in SPLITS:
            continue
        members, names, cls = {}, {}, {}
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext in IMAGE_EXTS:
                    members[key] = (ext, m.offset_data, m.size)
                elif ext in ("cls", "json"):
                    data = tar.extractfile(m).read()
                    if ext == "cls":
                        cls[key] = int(data)
                    else:
                        names[key] = json.loads(data)["name"]
        for key, (ext, offset, size) in members.items():
            for k, v in zip(rows, (split, cls[key], names[key], shard.name, key, ext, offset, size)):
                rows[k].append(v)
        digest = hashlib.sha256(shard.read_bytes()).hexdigest()
        for k, v in zip(shard_rows, (shard.name, split, shard.stat().st_size, len(members), digest)):
            shard_rows[k].append(v)
    meta = {b"metadist_format": str(FORMAT_VERSION).encode(), b"image_size": str(image_size).encode(),
            b"channels": str(channels).encode(), b"source": json.dumps(source or {}).encode()}
    table = pa.table(rows).replace_schema_metadata(meta)
    pq.write_table(table, out / "manifest.parquet")
    pq.write_table(pa.table(shard_rows).replace_schema_metadata(meta), out / "shards.parquet")
    return out / "manifest.parquet", out / "shards.parquet"


def check_counts(reports: Iterable[SplitReport], min_per_class: int) -> list[str]:
    """Lines reporting skipped images and classes with fewer than `min_per_class` images."""
    lines = []
    for r in reports:
        if r.skipped:
            lines.append(f"{r.split}: skipped {len(r.skipped)} unreadable image(s), e.g. {r.skipped[0][1]} "
                         f"({r.skipped[0][2]})")
        short = {c: n for c, n in r.written.items() if n < min_per_class}
        if short:
            lines.append(f"{r.split}: {len(short)} class(es) have fewer than {min_per_class} images: "
                         + ", ".join(f"{c} ({n})" for c, n in sorted(short.items())[:5]))
        missing = sum(r.found.values()) - sum(r.written.values()) - len(r.skipped)
        if missing:
            raise DataError(f"{r.split}: {missing} image(s) found but neither written nor skipped")
    return lines
