"""Users' own data as an ImageFolder tree: `root/<identity>/<image>.(jpg|jpeg|png|bmp|webp)`.

An identity is a folder name; a sample is one image in it. Images are read as grayscale squares so they feed
the same models as the embedded KanjiVG renderings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from components.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


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


def load_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 [size, size] grayscale; a missing, corrupt or truncated file raises DataError."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files only fail here, not at open
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            gray = im.convert("L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(gray, dtype=np.uint8)


def load_images(paths: Sequence[Path], size: int) -> np.ndarray:
    """Images as uint8 [n, size, size], in the order given."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = load_image(path, size)
    return out
