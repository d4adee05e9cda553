"""bench/characters.py, the real character set built from font faces, on the DejaVu fonts every machine
here has (the benchmark itself uses Noto CJK): layout, one-bit white-on-black drawings, determinism, and
the folders converter reading it."""

from __future__ import annotations

import glob
import sys

import numpy as np
import pytest
from PIL import Image

from metadist.data.convert import ImageOptions, convert
from metadist.data.manifest import Manifest

from ..conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import characters  # noqa: E402

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans*.ttf"
pytestmark = pytest.mark.skipif(len(glob.glob(DEJAVU)) < 2, reason="needs the DejaVu fonts (fonts-dejavu-core)")


def test_builds_a_class_per_character_and_a_drawing_per_face(tmp_path):
    args = ["--classes", "3,2,2", "--fonts", DEJAVU, "--region", "", "--codepoints", "41-5A", "--font-size", "60"]
    characters.main([str(tmp_path / "a"), *args])
    faces = characters.faces(DEJAVU, "")
    assert len(faces) >= 2
    for split, n in {"train": 3, "val": 2, "test": 2}.items():
        classes = sorted((tmp_path / "a" / split).iterdir())
        assert len(classes) == n and all(len(list(c.glob("*.png"))) == len(faces) for c in classes)
        assert all("U+0041" <= c.name <= "U+005A" for c in classes)
    names = [c.name for s in ("train", "val", "test") for c in (tmp_path / "a" / s).iterdir()]
    assert len(set(names)) == 7  # no character in two splits
    img = Image.open(next((tmp_path / "a" / "train").rglob("00.png")))
    pixels = np.asarray(img.convert("L"))
    assert img.mode == "1" and img.size == (105, 105) and set(np.unique(pixels)) == {0, 255}
    assert (pixels == 255).mean() < 0.5  # white strokes on black
    characters.main([str(tmp_path / "b"), *args])
    a, b = sorted((tmp_path / "a").rglob("*.png")), sorted((tmp_path / "b").rglob("*.png"))
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))  # a pure function of the seed
    convert("folders", tmp_path / "a", tmp_path / "out", opts=ImageOptions(size=28, filter="lanczos", grayscale=True))
    m = Manifest(tmp_path / "out")
    assert m.channels == 1 and m.image_size == 28 and len(m.class_counts("train")) == 3
    with pytest.raises(SystemExit):
        characters.main([str(tmp_path / "a"), *args])  # an existing folder is refused
