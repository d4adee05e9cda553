"""`metadist data convert`: the mini-ImageNet files users already have, turned into shards.

Formats (docs/reference.md, "File formats"):
- `ravi-csv`: `train.csv`, `val.csv`, `test.csv` (header `filename,label`) plus `images/`.
- `pickle-cache`: `mini-imagenet-cache-{train,val,test}.pkl` (`-validation.pkl` accepted for val):
  a dict with `image_data` (N, H, W, 3) uint8 and `class_dict` {wnid: [rows]}, str or bytes keys.
  Unpickled with an allow-list that admits numpy arrays and plain containers only, so even the named
  file cannot run code.
- `folders`: `{train,val,test}/<class>/*.{jpg,jpeg,png}` (any case): any dataset arranged as one folder
  per class under each split (Omniglot once its characters are arranged so).
- `torchmeta-hdf5`: `{split}_data.hdf5` (group `datasets`, one uint8 array per class) plus
  `{split}_labels.json`; needs h5py (the `hdf5` extra).
- `omniglot`: the Omniglot release as folders or its two zip files, or torchvision's `omniglot-py/`
  (`metadist.data.omniglot`: layouts and split policies). Stored grayscale and inverted: strokes 255
  on 0, as the MAML reference code feeds them to its network (it computes 1 - pixel / 255).

Every image is resized to `size` × `size` with the named filter when it is not already that size (or,
with `on_wrong_size="error"`, counted as an error), optionally made grayscale, and stored as JPEG (or PNG
where the source was PNG). Unreadable images are skipped and counted; the counts per split and class
are checked against what was found.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from metadist.data.format import SHARD_BYTES, DataError
from metadist.data.omniglot import SIZES, ZipMember, read_omniglot
from metadist.data.writer import SplitReport, index_shards, write_split
from metadist.config import SPLITS

FORMATS = ("ravi-csv", "pickle-cache", "folders", "torchmeta-hdf5", "omniglot")
FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
           "box": Image.Resampling.BOX}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class ImageOptions:
    size: int = 84
    filter: str = "bilinear"
    grayscale: bool = False
    on_wrong_size: str = "resize"  # or "error": count the image as unusable
    invert: bool = False  # 255 - pixel after the resize: dark strokes on white stored as white on black


def encode_image(source, opts: ImageOptions) -> tuple[bytes, str]:
    """A file path or an (H, W[, C]) uint8 array -> (stored bytes, extension); DataError if unusable."""
    try:
        if isinstance(source, (str, Path, ZipMember)):
            with Image.open(io.BytesIO(source.read()) if isinstance(source, ZipMember) else source) as img:
                fmt = (img.format or "JPEG").upper()
                img.load()
        else:
            img, fmt = Image.fromarray(np.asarray(source, dtype=np.uint8)), "JPEG"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, KeyError) as err:
        raise DataError(f"unreadable image ({type(err).__name__}: {str(err)[:120]})") from None
    if img.mode == "1":  # Pillow resizes one-bit images with `nearest` whatever the filter asked for
        img = img.convert("L")
    if img.size != (opts.size, opts.size):
        if opts.on_wrong_size == "error":
            raise DataError(f"image is {img.size[0]}x{img.size[1]}, not {opts.size}x{opts.size}")
        img = img.resize((opts.size, opts.size), FILTERS[opts.filter])
    img = img.convert("L" if opts.grayscale else "RGB")
    if opts.invert:
        img = ImageOps.invert(img)
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG")
        return buf.getvalue(), "png"
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg"


# -- reading each format: split -> [(class name, source)] -------------------------------------------

def _need_splits(found: dict, src: Path, what: str) -> dict:
    missing = [s for s in SPLITS if s not in found]
    if missing:
        raise DataError(f"{src}: no {' / '.join(missing)} split ({what}); found {sorted(found) or 'none'}")
    return found


def read_folders(src: Path) -> dict[str, list]:
    found = {s: src / s for s in SPLITS if (src / s).is_dir()}
    _need_splits(found, src, "expected {train,val,test}/<class>/ directories")
    out = {}
    for split, d in found.items():
        items = []
        for cls in sorted(p for p in d.iterdir() if p.is_dir()):
            items += [(cls.name, str(f)) for f in sorted(cls.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise DataError(f"{d}: no class folders with .jpg/.png images")
        out[split] = items
    return out


def read_ravi_csv(src: Path) -> dict[str, list]:
    found = {s: src / f"{s}.csv" for s in SPLITS if (src / f"{s}.csv").is_file()}
    _need_splits(found, src, "expected train.csv, val.csv and test.csv")
    images = src / "images"
    if not images.is_dir():
        raise DataError(f"{src}: no images/ directory beside the split CSVs")
    out = {}
    for split, path in found.items():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}: expected the header 'filename,label', got {reader.fieldnames}")
            # A listed file that is missing is skipped and counted like an unreadable one.
            out[split] = [(row["label"], str(images / row["filename"])) for row in reader]
    return out


class _ArraysOnly(pickle.Unpickler):
    """Admits numpy array reconstruction and nothing else: no function a pickle could call to run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"the pickle asks for {module}.{name}, which a mini-ImageNet cache never holds; refused")


def _cache_file(src: Path, split: str) -> Path | None:
    names = [f"mini-imagenet-cache-{split}.pkl"] + (["mini-imagenet-cache-validation.pkl"] if split == "val" else [])
    return next((src / n for n in names if (src / n).is_file()), None)


def read_pickle_cache(src: Path, log=print) -> dict[str, list]:
    found = {s: f for s in SPLITS if (f := _cache_file(src, s)) is not None}
    _need_splits(found, src, "expected mini-imagenet-cache-{train,val,test}.pkl")
    out = {}
    for split, path in found.items():
        log(f"unpickling {path} (you pointed at it; numpy arrays only, nothing else is loaded)")
        try:
            with open(path, "rb") as fh:
                data = _ArraysOnly(fh, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DataError(f"{path}: not a readable pickle cache ({err})") from None
        data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in data.items()}
        if "image_data" not in data or "class_dict" not in data:
            raise DataError(f"{path}: expected keys 'image_data' and 'class_dict', found {sorted(data)}")
        images = data["image_data"]
        items = []
        for cls, rows in sorted(data["class_dict"].items(), key=lambda kv: str(kv[0])):
            name = cls.decode() if isinstance(cls, bytes) else str(cls)
            items += [(name, images[int(r)]) for r in rows]
        out[split] = items
    return out


def read_torchmeta_hdf5(src: Path) -> dict[str, list]:
    try:
        import h5py
    except ImportError:
        raise DataError("torchmeta-hdf5 needs h5py: pip install 'metadist[hdf5]'") from None
    found = {s: src / f"{s}_data.hdf5" for s in SPLITS if (src / f"{s}_data.hdf5").is_file()}
    _need_splits(found, src, "expected {split}_data.hdf5 with {split}_labels.json")
    out = {}
    for split, path in found.items():
        labels_path = src / f"{split}_labels.json"
        if not labels_path.is_file():
            raise DataError(f"{src}: {path.name} has no {labels_path.name} beside it")
        labels = json.loads(labels_path.read_text())
        items = []
        with h5py.File(path, "r") as f:
            if "datasets" not in f:
                raise DataError(f"{path}: no 'datasets' group")
            group = f["datasets"]
            missing = [c for c in labels if c not in group]
            if missing:
                raise DataError(f"{path}: classes listed in {labels_path.name} are missing: {missing[:5]}")
            for cls in labels:
                arr = np.asarray(group[cls])
                items += [(cls, arr[i]) for i in range(arr.shape[0])]
        out[split] = items
    return out


READERS = {"ravi-csv": read_ravi_csv, "pickle-cache": read_pickle_cache, "folders": read_folders,
           "torchmeta-hdf5": read_torchmeta_hdf5, "omniglot": read_omniglot}


def convert(fmt: str, src: Path, out: Path, *, opts: ImageOptions = ImageOptions(), shard_bytes: float = SHARD_BYTES,
            workers: int = 1, seed: int = 0, progress=None, log=print, split: str = "maml",
            split_seed: int = 1, split_sizes: tuple[int, int] = SIZES) -> list[SplitReport]:
    """Read `src` in format `fmt`, write shards and the manifest to `out`; returns per-split reports.
    `split`, `split_seed` and `split_sizes` are the omniglot format's split policy (`metadist.data.omniglot`;
    the sizes are the reference code's 1,100 and 100 characters, smaller only for a small fixture)."""
    if fmt not in READERS:
        raise DataError(f"--format {fmt!r}: allowed: {', '.join(FORMATS)}")
    if opts.filter not in FILTERS:
        raise DataError(f"--filter {opts.filter!r}: allowed: {', '.join(FILTERS)}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataError(f"{src} does not exist")
    if (out / "manifest.parquet").exists():
        raise DataError(f"{out} already holds a dataset (manifest.parquet); choose an empty directory")
    source = {"format": fmt}
    if fmt == "omniglot":
        splits, source = read_omniglot(src, split=split, seed=split_seed, sizes=split_sizes, log=log)
        opts = replace(opts, grayscale=True, invert=True)
    else:
        splits = READERS[fmt](src, log=log) if fmt == "pickle-cache" else READERS[fmt](src)
    encode = partial(encode_image, opts=opts)
    reports = [write_split(out, name, items, encode, seed=seed, shard_bytes=shard_bytes, workers=workers,
                           progress=progress) for name, items in splits.items()]
    index_shards(out, opts.size, 1 if opts.grayscale else 3, source=source)
    return reports
