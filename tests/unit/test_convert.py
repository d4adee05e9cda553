"""The four converters on small fixtures in each exact on-disk format: all give the same manifest;
bad inputs are clear errors or counted skips."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from metadist.cli import app
from metadist.data.convert import ImageOptions, convert
from metadist.data.format import DataError
from metadist.data.manifest import Manifest
from metadist.data.writer import check_counts

CLASSES = {"train": ["n01532829", "n01558993", "n01704323"], "val": ["n01855672", "n02091244"],
           "test": ["n01930112", "n01981276"]}
PER_CLASS = 4


def _images():
    """split -> class -> list of (H, W, 3) uint8 arrays; train images are 30 px, to be resized."""
    rng = np.random.default_rng(0)
    return {s: {c: [rng.integers(0, 256, (30 if s == "train" else 24,) * 2 + (3,), dtype=np.uint8)
                    for _ in range(PER_CLASS)] for c in cs} for s, cs in CLASSES.items()}


def make_folders(root, images):
    for s, cs in images.items():
        for c, imgs in cs.items():
            (root / s / c).mkdir(parents=True)
            for i, a in enumerate(imgs):
                Image.fromarray(a).save(root / s / c / f"{c}_{i}.JPEG", quality=95)
    return root


def make_ravi(root, images):
    (root / "images").mkdir(parents=True)
    for s, cs in images.items():
        lines = ["filename,label"]
        for c, imgs in cs.items():
            for i, a in enumerate(imgs):
                name = f"{c}{i:08d}.jpg"
                Image.fromarray(a).save(root / "images" / name, quality=95)
                lines.append(f"{name},{c}")
        (root / f"{s}.csv").write_text("\n".join(lines) + "\n")
    return root


def make_pickle(root, images, bytes_keys=False):
    root.mkdir(parents=True)
    for s, cs in images.items():
        arrays, class_dict = [], {}
        for c, imgs in cs.items():
            class_dict[c.encode() if bytes_keys else c] = list(range(len(arrays), len(arrays) + len(imgs)))
            arrays += [np.asarray(Image.fromarray(a).resize((24, 24))) for a in imgs]
        data = {"image_data": np.stack(arrays), "class_dict": class_dict}
        if bytes_keys:
            data = {k.encode(): v for k, v in data.items()}
        name = "validation" if s == "val" else s  # learn2learn's file name for the val split
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as fh:
            pickle.dump(data, fh)
    return root


def make_hdf5(root, images):
    root.mkdir(parents=True)
    for s, cs in images.items():
        with h5py.File(root / f"{s}_data.hdf5", "w") as f:
            g = f.create_group("datasets")
            for c, imgs in cs.items():
                g.create_dataset(c, data=np.stack([np.asarray(Image.fromarray(a).resize((24, 24))) for a in imgs]))
        (root / f"{s}_labels.json").write_text(json.dumps(list(cs)))
    return root


MAKERS = {"folders": make_folders, "ravi-csv": make_ravi, "pickle-cache": make_pickle, "torchmeta-hdf5": make_hdf5}
OPTS = ImageOptions(size=24)


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_every_format_converts_to_the_same_manifest(fmt, tmp_path):
    src = MAKERS[fmt](tmp_path / "src", _images())
    reports = convert(fmt, src, tmp_path / "out", opts=OPTS, shard_bytes=4000, log=lambda m: None)
    assert check_counts(reports, min_per_class=PER_CLASS) == []
    m = Manifest(tmp_path / "out")
    assert m.image_size == 24
    for split, classes in CLASSES.items():
        assert m.class_counts(split) == {c: PER_CLASS for c in classes}
    m.verify("hash")
    data = m.read(m.rows("train")[:1])[0]
    assert Image.open(__import__("io").BytesIO(data)).size == (24, 24)  # the 30 px train images were resized


def test_pickle_cache_accepts_bytes_keys_and_refuses_code(tmp_path):
    src = make_pickle(tmp_path / "src", _images(), bytes_keys=True)
    convert("pickle-cache", src, tmp_path / "out", opts=OPTS, log=lambda m: None)
    assert len(Manifest(tmp_path / "out").class_counts("train")) == 3
    evil = tmp_path / "evil"
    evil.mkdir()
    for s in ("train", "val", "test"):
        (evil / f"mini-imagenet-cache-{s}.pkl").write_bytes(b"cos\nsystem\n(S'touch /tmp/metadist-pwned2'\ntR.")
    with pytest.raises(DataError, match="asks for os.system.*refused|asks for posix.system.*refused"):
        convert("pickle-cache", evil, tmp_path / "out2", opts=OPTS, log=lambda m: None)
    import os
    assert not os.path.exists("/tmp/metadist-pwned2")


def test_missing_split_is_named(tmp_path):
    src = make_folders(tmp_path / "src", _images())
    import shutil
    shutil.rmtree(src / "val")
    with pytest.raises(DataError, match="no val split"):
        convert("folders", src, tmp_path / "out", opts=OPTS)


def test_corrupt_images_are_skipped_and_counted_and_small_classes_reported(tmp_path):
    src = make_folders(tmp_path / "src", _images())
    bad = sorted((src / "train" / "n01532829").iterdir())[0]
    bad.write_bytes(b"not a jpeg at all")
    reports = convert("folders", src, tmp_path / "out", opts=OPTS)
    train = next(r for r in reports if r.split == "train")
    assert len(train.skipped) == 1 and "unreadable image" in train.skipped[0][2]
    lines = check_counts(reports, min_per_class=PER_CLASS)
    assert any("skipped 1 unreadable" in x for x in lines)
    assert any("fewer than 4 images: n01532829 (3)" in x for x in lines)


def test_wrong_size_can_be_an_error_instead_of_a_resize(tmp_path):
    src = make_folders(tmp_path / "src", _images())
    reports = convert("folders", src, tmp_path / "out", opts=ImageOptions(size=24, on_wrong_size="error"))
    train = next(r for r in reports if r.split == "train")
    assert len(train.skipped) == 3 * PER_CLASS and "not 24x24" in train.skipped[0][2]


def test_cli_convert_with_progress_and_one_line_errors(tmp_path):
    src = make_ravi(tmp_path / "src", _images())
    runner = CliRunner()
    res = runner.invoke(app, ["data", "convert", str(src), str(tmp_path / "out"), "--format", "ravi-csv",
                              "--size", "24", "--min-per-class", "4", "--workers", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "verify", str(tmp_path / "out")])
    assert res.exit_code == 0 and "shards match the manifest" in res.output
    res = runner.invoke(app, ["data", "convert", str(src), str(tmp_path / "o2"), "--format", "zip"])
    text = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "'zip' is not one of 'ravi-csv', 'pickle-cache', 'folders', 'torchmeta-hdf5'" in text
    res = runner.invoke(app, ["data", "convert", str(tmp_path / "nope"), str(tmp_path / "o3"), "--format", "folders"])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())
