"""Users' own data as an ImageFolder tree: `root/<identity>/<image>.(jpg|jpeg|png|bmp|webp)`.

An identity is a folder name; a sample is one image in it. Images are read as squares of data.image_size, in
grayscale (data.channels: 1, as the embedded KanjiVG renderings) or RGB (data.channels: 3, as face crops).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import BinaryIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from components.config import DataConfig
from components.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MAX_PIXELS: int = DataConfig.model_fields["max_pixels"].default  # data.max_pixels's default, defined once there
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _visible(path: Path) -> bool:
    # Skip .DS_Store, .ipynb_checkpoints and the like: they are never identities or samples.
    return not path.name.startswith(".")


def scan(root: Path) -> list[tuple[Path, str]]:
    """All (image path, identity) pairs under `root`, sorted, so sample order is the same on every machine."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    pairs: list[tuple[Path, str]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _visible(p)):
        for path in sorted(folder.iterdir()):
            if path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_SUFFIXES:
                pairs.append((path, folder.name))
    if not pairs:
        suffixes = "|".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise DataError(f"{root}: no identity folders with images (expected root/<identity>/<image>.({suffixes}))")
    return pairs


def _too_big(path: Path, pixels: int, max_pixels: int, dims: str = "") -> DataError:
    return DataError(f"{path}: {dims}{pixels:,} pixels is more than data.max_pixels = {max_pixels:,}; "
                     "shrink the image or raise data.max_pixels")  # fmt: skip


def _gray8(im: Image.Image, path: Path, fmt: str | None) -> Image.Image:
    """8-bit grayscale. 16-bit pixels are scaled to 8 bits (round(v / 257)): PIL's convert("L") clips them, so
    every pixel above 255 of 65535 would turn white. 16-bit RGB PNGs already open as 8-bit RGB."""
    if im.mode not in SIXTEEN_BIT_MODES and im.mode != "I":
        return im.convert("L")
    v = np.asarray(im, dtype=np.int64)  # [H, W]
    lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise DataError(f"{path}: 32-bit integer pixels ({lo}..{hi}) are not supported; save it as 8 or 16 bits")
    if im.mode in SIXTEEN_BIT_MODES or fmt == "PNG" or hi > 255:  # mode "I" from a PNG holds 16-bit data
        v = (v + 128) // 257
    return Image.fromarray(v.astype(np.uint8), "L")


def _rgb8(im: Image.Image, path: Path, fmt: str | None) -> Image.Image:
    """8-bit RGB; 16-bit grayscale is scaled to 8 bits first (as `_gray8`), then repeated over three channels."""
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        return _gray8(im, path, fmt).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # transparent pixels onto white, not the black PIL's convert("RGB") leaves
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path, size: int, max_pixels: int = MAX_PIXELS, channels: int = 1) -> np.ndarray:
    """One image file as uint8 [size, size] grayscale (channels 1) or [size, size, 3] RGB (channels 3); a
    missing, corrupt, truncated or too large file raises DataError naming it."""
    return decode_image(path, str(path), size, max_pixels, channels)


def decode_image(
    source: Path | BinaryIO, name: str, size: int | None, max_pixels: int = MAX_PIXELS, channels: int = 1
) -> np.ndarray:
    """A file, or encoded bytes in a file object (RecordIO, WebDataset, .bin payloads), as uint8 [H, W] grayscale
    or [H, W, 3] RGB, resized to size x size (bilinear) unless `size` is None. `name` (a file, or file and key)
    starts every error.

    The pixel budget `max_pixels` is checked on the header's width x height, before anything is decoded.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb check must never refuse what data.max_pixels allows
    where = Path(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below speaks instead
            with Image.open(source) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise _too_big(where, width * height, max_pixels, f"{width}x{height} = ")
                fmt = im.format
                im.load()  # decode now: truncated files only fail here, not at open
                im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
                pixels = _gray8(im, where, fmt) if channels == 1 else _rgb8(im, where, fmt)
    except Image.DecompressionBombError as e:  # over 2x PIL's limit, refused by Image.open itself
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_big(where, int(found.group(1)) if found else max_pixels + 1, max_pixels) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: cannot decode image: {e}") from e
    if size is not None and pixels.size != (size, size):
        pixels = pixels.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(pixels, dtype=np.uint8)


def load_images(paths: Sequence[Path], size: int, max_pixels: int = MAX_PIXELS, channels: int = 1) -> np.ndarray:
    """Images as uint8 [n, size, size] (or [n, size, size, 3]), in the order given."""
    out = np.empty((len(paths), size, size) + ((3,) if channels == 3 else ()), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = load_image(path, size, max_pixels, channels)
    return out
