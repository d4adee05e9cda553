"""What a shard sample may hold, and how its members are decoded (images, integers and JSON only)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, UnidentifiedImageError

from metadist.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png")
ALLOWED_EXTS = set(IMAGE_EXTS) | {"cls", "json"}
# Members that some tools put in shards and that decode by unpickling: refused, never read.
PICKLE_EXTS = {"pyd", "pickle", "pkl", "pth", "pt", "npy", "npz"}
FORMAT_VERSION = 1
SHARD_BYTES = 64e6  # target shard size: several train shards per worker even for mini-ImageNet


class DataError(UserError, ValueError):
    """A dataset, shard or input file that cannot be used as it is; the message names it."""


def check_members(sample: dict, where: str) -> str:
    """The image extension of a raw sample; DataError for pickle or unknown members, or no image."""
    exts = {k for k in sample if not k.startswith("__")}
    bad = exts & PICKLE_EXTS
    if bad:
        raise DataError(f"{where}: sample {sample.get('__key__')!r} has a {sorted(bad)[0]!r} member; "
                        f"metadist never unpickles shard contents (only {sorted(ALLOWED_EXTS)} are read)")
    unknown = exts - ALLOWED_EXTS
    if unknown:
        raise DataError(f"{where}: sample {sample.get('__key__')!r} has unexpected members {sorted(unknown)}; "
                        f"allowed: {sorted(ALLOWED_EXTS)}")
    images = [e for e in IMAGE_EXTS if e in exts]
    if len(images) != 1 or "cls" not in exts:
        raise DataError(f"{where}: sample {sample.get('__key__')!r} needs one image and a .cls member, "
                        f"has {sorted(exts)}; the shard may be truncated or changed (`metadist data verify`)")
    return images[0]


def decode_image(data: bytes, channels: int, size: int | None = None) -> np.ndarray:
    """Image bytes -> uint8 array (channels, H, W); resized to size×size if it is not already."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode image ({type(err).__name__}: {err})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_cls(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def decode_json(data: bytes) -> dict:
    return json.loads(data.decode("utf-8"))
