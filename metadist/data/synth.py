"""`metadist data synth`: a synthetic dataset in the mini-ImageNet layout (64 / 16 / 20 classes).

Every class has a procedural prototype: a shape (one of ten), a foreground and a background colour,
and a stripe texture of its own frequency and angle. Its images are random augmentations of the
prototype: position, scale, rotation, colour jitter and pixel noise. Classes therefore differ in ways a
few examples reveal, so a meta-learner can clearly beat chance, and every image is a pure function of
(seed, split, class, index).
"""

from __future__ import annotations

import io
import math
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metadist.config import SPLITS
from metadist.data.format import SHARD_BYTES

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star", "hexagon", "arc")
CLASSES = {"train": 64, "val": 16, "test": 20}


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([abs(hash_part(k)) for k in key])


def hash_part(k) -> int:
    if isinstance(k, str):
        return sum((i + 1) * ord(ch) for i, ch in enumerate(k))
    return int(k)


def prototype(seed: int, split: str, c: int) -> dict:
    r = _rng(seed, split, c, 1)
    return {"shape": SHAPES[r.integers(len(SHAPES))], "fg": r.integers(40, 256, 3), "bg": r.integers(0, 200, 3),
            "freq": r.uniform(0.0, 0.35), "angle": r.uniform(0, math.pi), "size": r.uniform(0.35, 0.55)}


def _polygon(shape: str, cx: float, cy: float, s: float, rot: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [(0, -1), (0.87, 0.5), (-0.87, 0.5)]
    elif shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":
        pts = [(math.cos(a) * (1 if i % 2 == 0 else 0.45), math.sin(a) * (1 if i % 2 == 0 else 0.45))
               for i, a in enumerate(np.linspace(-math.pi / 2, 1.5 * math.pi, 10, endpoint=False))]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    elif shape == "bar":
        pts = [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]
    elif shape == "cross":
        pts = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
               (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]
    else:  # square
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    c, s_ = math.cos(rot), math.sin(rot)
    return [(cx + s * (x * c - y * s_), cy + s * (x * s_ + y * c)) for x, y in pts]


def render(seed: int, split: str, c: int, i: int, size: int) -> np.ndarray:
    """Image i of class c: an augmented copy of the class prototype, uint8 (size, size, 3)."""
    p = prototype(seed, split, c)
    r = _rng(seed, split, c, 2, i)
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * p["freq"] * size * (xx * math.cos(p["angle"]) + yy * math.sin(p["angle"])))
    bg = p["bg"][None, None, :] * (0.75 + 0.25 * stripes[..., None])
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy = size * (0.5 + r.uniform(-0.12, 0.12)), size * (0.5 + r.uniform(-0.12, 0.12))
    s = size * p["size"] * r.uniform(0.8, 1.15) / 2
    rot = r.uniform(-0.35, 0.35)
    fg = tuple(int(v) for v in np.clip(p["fg"] + r.integers(-20, 21, 3), 0, 255))
    if p["shape"] == "circle":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fg)
    elif p["shape"] == "ring":
        draw.ellipse([cx - s, cy - s, cx + s, cy + s], outline=fg, width=max(2, int(s / 3)))
    elif p["shape"] == "arc":
        draw.arc([cx - s, cy - s, cx + s, cy + s], start=math.degrees(rot), end=math.degrees(rot) + 220,
                 fill=fg, width=max(2, int(s / 3)))
    else:
        draw.polygon(_polygon(p["shape"], cx, cy, s, rot), fill=fg)
    arr = np.asarray(img, dtype=np.float32) + r.normal(0, 10, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def encode(source: tuple, quality: int = 90, fmt: str = "jpg", channels: int = 3) -> tuple[bytes, str]:
    """(seed, split, class, index, size) -> image bytes: JPEG by default, the format mini-ImageNet images
    come in, or grayscale PNG (`fmt="png", channels=1`), the format of character sets such as Omniglot."""
    buf = io.BytesIO()
    img = Image.fromarray(render(*source))
    img = img.convert("L") if channels == 1 else img
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": quality} if fmt == "jpg" else {}))
    return buf.getvalue(), fmt


def items(seed: int, split: str, per_class: int, size: int, classes: int | None = None) -> list[tuple[str, tuple]]:
    n = CLASSES[split] if classes is None else classes
    return [(f"s{split[:2]}{c:03d}", (seed, split, c, i, size)) for c in range(n) for i in range(per_class)]


def synth_dataset(out: Path, *, per_class: int = 600, size: int = 84, seed: int = 0, workers: int = 1,
                  shard_bytes: float = SHARD_BYTES, classes: dict | None = None, fmt: str = "jpg",
                  channels: int = 3, progress=None):
    """Write the three splits and the manifest; returns the per-split reports. `fmt` ("jpg" or "png")
    and `channels` (3, or 1 for grayscale) choose how images are stored."""
    from metadist.data.writer import index_shards, write_split

    reports = []
    enc = partial(encode, fmt=fmt, channels=channels)
    for split in SPLITS:
        its = items(seed, split, per_class, size, (classes or {}).get(split))
        reports.append(write_split(Path(out), split, its, enc, seed=seed, shard_bytes=shard_bytes,
                                   workers=workers, progress=progress))
    index_shards(Path(out), size, channels, source={"format": "synth", "seed": seed})
    return reports
