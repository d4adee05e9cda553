"""How stored images are decoded (into a batch, straight from their bytes), and the format's constants.

Readers take an image's bytes at its manifest offset: no other shard member is ever read, so nothing
in a shard is unpickled or run.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

from metadist.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png")
FORMAT_VERSION = 1
SHARD_BYTES = 64e6  # target shard size: several train shards per worker even for mini-ImageNet


class DataError(UserError, ValueError):
    """A dataset, shard or input file that cannot be used as it is; the message names it."""


_PIL_FORMATS = {"jpg": ("JPEG",), "jpeg": ("JPEG",), "png": ("PNG",)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png(data) -> tuple | None:
    """(width, height, mode, zlib stream, decoder args) of an 8-bit, non-interlaced gray or RGB PNG."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth != 8 or interlace or colour not in (0, 2):
        return None
    mode, parts, pos, end = ("L" if colour == 0 else "RGB"), [], 33, len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            parts.append(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    return w, h, mode, parts[0] if len(parts) == 1 else b"".join(parts), ("zip", (mode,))


def _jpeg(data) -> tuple | None:
    """(width, height, mode, data, decoder args) of an 8-bit gray or YCbCr JPEG (no Adobe marker)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xEE:  # Adobe: colour transforms that Pillow's own reader handles
            return None
        if marker in _JPEG_SOF:
            precision, h, w, components = struct.unpack_from(">BHHB", data, pos + 4)
            if precision != 8 or components not in (1, 3):
                return None
            mode = "L" if components == 1 else "RGB"
            return w, h, mode, data, ("jpeg", (mode, ""))
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


class _Direct:
    """Pillow's own C decoders (zlib for PNG, libjpeg for JPEG) run on the image data straight into the
    batch's memory. Pillow's Python reader, which parses headers and copies the pixels out twice
    (tobytes, then numpy), costs 3 times the decode of a 28 px PNG. Images that this path does not take
    (other modes, sizes, bit depths, interlaced PNGs, Adobe JPEGs) and any decoder error go through
    Pillow's reader, which gives the error message. The first image of each kind in a process is also
    decoded by Pillow's reader and compared, so a Pillow whose internals differ falls back to its reader
    instead of giving wrong pixels."""

    checked: dict[tuple, bool] = {}

    def __init__(self, height: int, width: int, channels: int):
        self.size, self.box, self.want = (width, height), (0, 0, width, height), ("L" if channels == 1 else "RGB")
        # Pillow keeps RGB as 4 bytes a pixel: the batch is RGBX, and the X byte is never read.
        self.mode = "L" if channels == 1 else "RGBX"
        self.usable = hasattr(Image.core, "map_buffer")

    def __call__(self, data, slot: np.ndarray) -> bool:
        """Decode `data` into `slot` (H, W, 1 or 4), or leave it to Pillow's reader (False)."""
        if not self.usable:
            return False
        try:
            info = _png(data) if data[:4] == b"\x89PNG" else _jpeg(data)
        except struct.error:  # a header cut short: Pillow's reader names the problem
            return False
        if info is None or info[:3] != (*self.size, self.want):
            return False
        name, args = info[4]
        key = (name, self.mode)
        ok = self.checked.get(key)
        if ok is False:
            return False
        try:
            # What Pillow's Image.frombuffer and Image._getdecoder do, without their argument handling
            # (which costs as much as decoding a 28 px PNG).
            target = Image.core.map_buffer(slot, self.size, "raw", 0, (self.mode, 0, 1))
            decoder = getattr(Image.core, f"{name}_decoder")(self.mode, *args)
            try:
                decoder.setimage(target, self.box)
                consumed, err = decoder.decode(info[3])
            finally:
                decoder.cleanup()
        except Exception:  # noqa: BLE001 - Pillow's reader decodes it, or names the problem
            return False
        if consumed >= 0 or err < 0:  # not finished with all the data, or an error
            return False
        if ok is None:
            reference = np.asarray(Image.open(io.BytesIO(data)).convert(self.want))
            self.checked[key] = bool(np.array_equal(reference.reshape(*slot.shape[:2], -1),
                                                    slot[..., :len(self.want)]))
            return self.checked[key]
        return True


def pixel_batch(n: int, size: int, channels: int) -> np.ndarray:
    """An uninitialised uint8 batch for `decode_into`: (n, size, size, 1) gray, or (n, size, size, 4) RGBX
    (Pillow's own layout, so its decoders write into it directly; `[..., :3]` is the RGB image)."""
    return np.empty((n, size, size, 1 if channels == 1 else 4), np.uint8)


def decode_into(out: np.ndarray, blobs, where: str, formats=("JPEG", "PNG")) -> np.ndarray:
    """Decode image bytes into out[i] of a `pixel_batch`; nothing else is allocated per image. Images of
    another mode or size are converted (to L or RGB) and resized (bilinear). `formats` are the Pillow
    formats to try (the manifest's extensions): naming them skips Pillow's probing of every other
    format. Returns the (n, H, W, channels) view of the pixels."""
    channels = 1 if out.shape[3] == 1 else 3
    direct = _Direct(out.shape[1], out.shape[2], channels)
    mode = "L" if channels == 1 else "RGB"
    size = (out.shape[2], out.shape[1])
    for i, data in enumerate(blobs):
        slot = out[i]
        if direct(data, slot):
            continue
        try:
            with Image.open(io.BytesIO(data), formats=formats) as img:
                if img.mode != mode:
                    img = img.convert(mode)
                if img.size != size:
                    img = img.resize(size, Image.Resampling.BILINEAR)
                slot[..., :channels] = np.asarray(img).reshape(*slot.shape[:2], channels)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"{where}: cannot decode image ({type(err).__name__}: {err})") from None
    return out[..., :channels]


def pil_formats(exts) -> tuple[str, ...]:
    """The Pillow format names of image extensions (jpg, png)."""
    return tuple(sorted({f for e in exts for f in _PIL_FORMATS.get(str(e).lower(), ("JPEG", "PNG"))}))
