"""A real character set that can be had on this machine: ideographs drawn by every face of a font family,
written as `{train,val,test}/<class>/*.png` for the `folders` converter.

Omniglot cannot be downloaded here, and the synthetic quickstart images prove nothing about real data.
This builds an Omniglot-like stand-in from Debian's Noto CJK fonts: a class is one ideograph, a "drawer"
is one face of the family (each weight of the sans and the serif style), and every image gets a small
random affine jitter (rotation, scale, shear, shift) of its own, as handwriting varies between drawings.
Images are 105 x 105 one-bit, white strokes on black (what the omniglot converter stores), so the same
jobs run on them unchanged.

    apt-get install fonts-noto-cjk fonts-noto-cjk-extra     # 4 faces, or 14 with -extra
    python bench/characters.py data/cjk-src                   # 1,100 / 100 / 423 classes, as Omniglot's split
    metadist data convert --format folders data/cjk-src data/cjk --grayscale --size 28 --filter lanczos
    metadist train jobs/omniglot/maml-5w1s.yaml --set data.path=data/cjk

Which characters: a seeded sample of the CJK Unified Ideographs block (U+4E00 to U+9FA5), which every
Noto CJK face covers. Everything is a pure function of `--seed`.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.progress import Progress

FONTS = "/usr/share/fonts/opentype/noto/NotoS*CJK*.ttc"
REGION = " SC"  # one regional variant: the JP/KR/SC/TC faces of one weight draw most ideographs alike
CANVAS = 105


def faces(pattern: str, region: str) -> list[tuple[str, int, str]]:
    """(file, face index, "family style") of every face in the font files matching `pattern` whose
    family ends with `region` ("" for all), sorted by name."""
    found = {}
    for path in sorted(glob.glob(pattern)):
        for index in range(64):  # a .ttc holds a few faces; .ttf one
            try:
                family, style = ImageFont.truetype(path, 20, index=index).getname()
            except OSError:
                break
            if family.endswith(region):
                found.setdefault(f"{family} {style}", (path, index))
    return [(path, index, name) for name, (path, index) in sorted(found.items())]


def jitter(rng: np.random.Generator) -> tuple[float, ...]:
    """The inverse affine map (PIL's AFFINE data) of a random rotation (+-10 degrees), scale (0.85 to
    1.05), shear (+-0.15) and shift (+-6 px) about the canvas centre."""
    angle, scale = math.radians(rng.uniform(-10, 10)), rng.uniform(0.85, 1.05)
    shear, dx, dy = rng.uniform(-0.15, 0.15), *rng.uniform(-6, 6, 2)
    cos, sin = math.cos(angle), math.sin(angle)
    # forward: p' = c + S R H (p - c) + d; PIL wants the inverse, output -> input
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1, shear], [0, 1]]) * scale
    inv = np.linalg.inv(forward)
    c = np.array([CANVAS / 2, CANVAS / 2])
    offset = c - inv @ (c + np.array([dx, dy]))
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def draw(char: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator) -> Image.Image:
    """One drawing: `char` in white on black, centred, jittered, made one-bit."""
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), char, fill=255, font=font, anchor="mm")
    img = img.transform(img.size, Image.Transform.AFFINE, jitter(rng), resample=Image.Resampling.BILINEAR)
    return img.point(lambda v: 255 if v >= 128 else 0).convert("1")


def build(out: Path, counts: dict[str, int], fonts: list[tuple[str, int, str]], codepoints: range,
          seed: int, size: int = 80, progress: Progress | None = None) -> dict[str, int]:
    """Write `counts[split]` classes of `len(fonts)` drawings each; returns the images written per split."""
    rng = np.random.default_rng(seed)
    total = sum(counts.values())
    if total > len(codepoints):
        raise SystemExit(f"error: {total} classes asked for, the range holds {len(codepoints)} characters")
    chars = [chr(c) for c in rng.choice(np.asarray(codepoints), total, replace=False)]
    loaded = [ImageFont.truetype(path, size, index=index) for path, index, _ in fonts]
    task = progress.add_task("drawing", total=total * len(loaded)) if progress else None
    written, start = {}, 0
    for split, n in counts.items():
        for char in chars[start:start + n]:
            folder = out / split / f"U+{ord(char):04X}"
            folder.mkdir(parents=True, exist_ok=True)
            for d, font in enumerate(loaded):
                draw(char, font, np.random.default_rng([seed, ord(char), d])).save(folder / f"{d:02d}.png")
                if progress:
                    progress.advance(task)
        written[split] = n * len(loaded)
        start += n
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to write {train,val,test}/<class>/*.png into (must not exist)")
    ap.add_argument("--classes", default="1100,100,423", help="classes per split, TRAIN,VAL,TEST (Omniglot's)")
    ap.add_argument("--fonts", default=FONTS, help="font files (a glob); each face is one drawer")
    ap.add_argument("--region", default=REGION, help="keep the faces whose family ends with this ('' for all)")
    ap.add_argument("--codepoints", default="4E00-9FA5", help="the character range to sample, hex START-END")
    ap.add_argument("--font-size", type=int, default=80, help="glyph size in pixels on the 105 px canvas")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        counts = dict(zip(("train", "val", "test"), (int(n) for n in args.classes.split(",", 2))))
        lo, hi = (int(x, 16) for x in args.codepoints.split("-"))
    except ValueError:
        ap.error("--classes is TRAIN,VAL,TEST and --codepoints hex START-END, such as 1100,100,423 and 4E00-9FA5")
    if len(counts) != 3 or min(counts.values()) < 1 or hi < lo:
        ap.error("--classes needs three positive counts and --codepoints START <= END")
    if args.out.exists():
        ap.error(f"{args.out} exists; choose a new folder")
    found = faces(args.fonts, args.region)
    if len(found) < 2:
        ap.error(f"{len(found)} font face(s) match {args.fonts!r} with family ending {args.region!r}: need at least "
                 f"2 drawers (apt-get install fonts-noto-cjk fonts-noto-cjk-extra)")
    print(f"{len(found)} drawers: " + ", ".join(name for _, _, name in found), file=sys.stderr)
    with Progress() as progress:
        written = build(args.out, counts, found, range(lo, hi + 1), args.seed, args.font_size, progress)
    print(" ".join(f"{split}: {counts[split]} classes, {n} images" for split, n in written.items()))


if __name__ == "__main__":
    main()
