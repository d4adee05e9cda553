"""The Omniglot converter on a small tree in the release's layout (a few alphabets of random strokes),
as folders, as its two zip files, and as torchvision's download folder; its split policies; bad input."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from typer.testing import CliRunner

from metadist.cli import app
from metadist.data.convert import FILTERS, ImageOptions, convert
from metadist.data.format import DataError
from metadist.data.manifest import Manifest
from metadist.data.omniglot import SIZES, split_characters

ALPHABETS = {"images_background": {"Latin": 4, "Greek": 3}, "images_evaluation": {"Tifinagh": 3}}
SMALL = (4, 2)  # train and val characters of the maml split on this 10-character tree
OPTS = ImageOptions(size=28, filter="lanczos")


def drawing(rng) -> Image.Image:
    """A 105 x 105 one-bit image as in the release: a few dark strokes (0) on white (1)."""
    img = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        draw.line([tuple(int(v) for v in rng.integers(5, 100, 2)) for _ in range(3)], fill=0, width=3)
    return img


def make_omniglot(root, drawings=20, seed=0):
    rng = np.random.default_rng(seed)
    for part, alphabets in ALPHABETS.items():
        for alphabet, n in alphabets.items():
            for c in range(1, n + 1):
                folder = root / part / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, drawings + 1):
                    drawing(rng).save(folder / f"{c:02d}{d:02d}_{d:02d}.png")
    return root


def zip_sets(tree, dest):
    """The release's two zip files of `tree`, each with its set's folder at the top."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in ALPHABETS:
        with zipfile.ZipFile(dest / f"{part}.zip", "w") as z:
            for path in sorted((tree / part).rglob("*")):
                z.write(path, path.relative_to(tree).as_posix())
    return dest


def _convert(src, out, **kw):
    notes = []
    reports = convert("omniglot", src, out, opts=OPTS, split_sizes=kw.pop("sizes", SMALL), log=notes.append, **kw)
    return Manifest(out), reports, notes


def _images(m: Manifest, split: str) -> dict[str, list[bytes]]:
    rows = m.rows(split)
    out: dict[str, list[bytes]] = {}
    for name, data in zip(m.samples["class_name"][rows], m.read(rows)):
        out.setdefault(str(name), []).append(data)
    return {k: sorted(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


def test_folders_zips_and_torchvisions_folder_give_the_same_dataset(tree, tmp_path):
    base, _, notes = _convert(tree, tmp_path / "folders")
    assert notes == []
    zips, _, _ = _convert(zip_sets(tree, tmp_path / "zips"), tmp_path / "from-zips")
    vision = tmp_path / "torchvision"
    zip_sets(tree, vision / "omniglot-py")
    from_parent, _, _ = _convert(vision, tmp_path / "from-torchvision")
    from_inner, _, _ = _convert(vision / "omniglot-py", tmp_path / "from-torchvision-inner")
    for other in (zips, from_parent, from_inner):
        for split in ("train", "val", "test"):
            assert _images(other, split) == _images(base, split)
    assert base.image_size == 28 and base.channels == 1
    assert base.source == {"format": "omniglot", "split": "maml", "split_seed": 1,
                           "characters": {"train": 4, "val": 2, "test": 4}, "skipped_characters": 0}


def test_the_maml_split_is_a_seeded_shuffle_of_all_characters(tree, tmp_path):
    m, reports, _ = _convert(tree, tmp_path / "a")
    classes = {s: set(_images(m, s)) for s in ("train", "val", "test")}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [4, 2, 4]
    everything = {f"{a}/character{c:02d}" for sets in ALPHABETS.values() for a, n in sets.items()
                  for c in range(1, n + 1)}
    assert set.union(*classes.values()) == everything and sum(map(len, classes.values())) == 10
    assert all(n == 20 for r in reports for n in r.written.values())
    again, _, _ = _convert(tree, tmp_path / "b")
    assert {s: set(_images(again, s)) for s in classes} == classes
    other, _, _ = _convert(tree, tmp_path / "c", split_seed=5)
    assert {s: set(_images(other, s)) for s in classes} != classes and other.source["split_seed"] == 5


def test_the_reference_sizes_and_the_vinyals_split():
    background = [(f"B{a}", f"character{c:02d}") for a in range(30) for c in range(1, 33)]  # 960
    evaluation = [(f"E{a}", f"character{c:02d}") for a in range(20) for c in range(1, 34)]  # 660
    maml = split_characters(background, evaluation, "maml", 1)
    assert [len(maml[s]) for s in ("train", "val", "test")] == [1100, 100, 420] and SIZES == (1100, 100)
    # A pure function of the names and the seed: the order the files were listed in does not matter.
    assert split_characters(background[::-1], evaluation[::-1], "maml", 1) == maml
    vinyals = split_characters(background, evaluation, "vinyals", 1)
    assert sorted(vinyals["test"]) == sorted(evaluation)
    assert sorted(vinyals["train"] + vinyals["val"]) == sorted(background) and len(vinyals["val"]) == 100
    with pytest.raises(DataError, match="--split maml needs more than 1200 characters"):
        split_characters(background[:500], evaluation[:500], "maml", 1)


def test_vinyals_keeps_the_background_and_evaluation_alphabets_apart(tree, tmp_path):
    m, _, _ = _convert(tree, tmp_path / "v", split="vinyals", sizes=(0, 2))
    alphabets = {s: {name.split("/")[0] for name in _images(m, s)} for s in ("train", "val", "test")}
    assert alphabets["test"] == {"Tifinagh"} and alphabets["train"] | alphabets["val"] <= {"Latin", "Greek"}
    assert len(_images(m, "val")) == 2 and len(_images(m, "train")) == 5


def test_strokes_are_stored_white_on_black_after_a_real_lanczos_resize(tree, tmp_path):
    m, _, _ = _convert(tree, tmp_path / "out")
    rows = m.rows("train")
    name = str(m.samples["class_name"][rows[0]])
    stored = np.asarray(Image.open(io.BytesIO(m.read(rows[:1])[0])))
    assert stored.shape == (28, 28) and stored.dtype == np.uint8
    sources = sorted((tree / "images_background" / name).glob("*.png")) if (tree / "images_background" / name).is_dir() \
        else sorted((tree / "images_evaluation" / name).glob("*.png"))
    expected = [np.asarray(ImageOps.invert(Image.open(p).convert("L").resize((28, 28), FILTERS["lanczos"])))
                for p in sources]
    assert any(np.array_equal(stored, e) for e in expected)  # PNG is lossless: exactly these pixels
    assert stored.mean() < 128 and stored.max() > 200  # mostly background (0), strokes near 255
    assert len(np.unique(stored)) > 2  # anti-aliased: a one-bit image is made 8-bit before resizing


def test_bad_input_is_skipped_and_counted_or_one_clear_error(tmp_path):
    src = make_omniglot(tmp_path / "src")
    latin = src / "images_background" / "Latin"
    for f in sorted((latin / "character02").glob("*.png"))[5:]:
        f.unlink()  # 5 drawings left
    (latin / "character01" / "notes.txt").write_text("not a drawing")
    (latin / "character03" / "0399_99.png").write_bytes(b"not a png")
    (src / "images_evaluation" / "Empty").mkdir()
    m, reports, notes = _convert(src, tmp_path / "out")
    text = "\n".join(notes)
    assert "skipped 1 (not a PNG file)" in text and "notes.txt" in text
    assert "skipped 1 (empty alphabet)" in text and "Empty" in text
    assert "skipped 1 (fewer than 20 drawings, character left out)" in text and "Latin/character02 (5)" in text
    skipped = [s for r in reports for s in r.skipped]
    assert len(skipped) == 1 and "0399_99.png" in skipped[0][1] and "unreadable image" in skipped[0][2]
    # The short character is left out after the split: the others keep the splits they had.
    full, _, _ = _convert(make_omniglot(tmp_path / "clean"), tmp_path / "clean-out")
    for s in ("train", "val", "test"):
        assert set(_images(m, s)) == set(_images(full, s)) - {"Latin/character02"}
    assert m.source["skipped_characters"] == 1

    not_omniglot = tmp_path / "zips"
    not_omniglot.mkdir()
    for part in ALPHABETS:
        with zipfile.ZipFile(not_omniglot / f"{part}.zip", "w") as z:
            z.writestr("photos/cat.jpg", b"...")
    with pytest.raises(DataError, match="not Omniglot's images_background.zip: 'photos/cat.jpg' is outside"):
        _convert(not_omniglot, tmp_path / "o1")
    (not_omniglot / "images_background.zip").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable zip file"):
        _convert(not_omniglot, tmp_path / "o2")
    half = tmp_path / "half"
    (half / "images_background" / "Latin" / "character01").mkdir(parents=True)
    with pytest.raises(DataError, match="has images_background but not images_evaluation"):
        _convert(half, tmp_path / "o3")
    with pytest.raises(DataError, match="not Omniglot: expected images_background/ and images_evaluation/"):
        _convert(tmp_path / "out", tmp_path / "o4")


def test_cli_converts_at_28_pixels_and_says_what_is_wrong_in_one_line(tree, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "convert", str(tree), str(tmp_path / "out"), "--format", "omniglot"])
    assert res.exit_code == 2, res.output
    assert "--split maml needs more than 1200 characters (1100 train, 100 val, the rest test); found 10" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["data", "convert", str(tree), str(tmp_path / "o2"), "--format", "omniglot",
                              "--split", "other"])
    assert res.exit_code == 2 and "'other' is not one of 'maml', 'vinyals'" in " ".join(res.output.replace("│", " ").split())
