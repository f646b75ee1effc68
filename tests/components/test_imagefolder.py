"""Users' ImageFolder trees: scanning identities and decoding images, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data import imagefolder
from components.errors import DataError


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    _write(root / "bob" / "b.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _write(root / "bob" / "a.JPG", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    _write(root / "alice" / "x.bmp", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / ".hidden.png").write_bytes(b"")
    (root / "empty").mkdir()
    (root / "stray.png").write_bytes(b"")  # not inside an identity folder
    return root


def test_scan_lists_images_by_identity_sorted(tree: Path) -> None:
    pairs = imagefolder.scan(tree)
    assert pairs == [
        (tree / "alice" / "x.bmp", "alice"),
        (tree / "bob" / "a.JPG", "bob"),
        (tree / "bob" / "b.png", "bob"),
    ]


def test_scan_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        imagefolder.scan(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_scan_root_without_images_names_it(tmp_path: Path) -> None:
    (tmp_path / "only" / "empty").mkdir(parents=True)
    (tmp_path / "only" / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no identity folders") as info:
        imagefolder.scan(tmp_path / "only")
    assert str(tmp_path / "only") in str(info.value)


def test_load_image_gray_square_resized(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, 20:] = (255, 255, 255)  # right half white
    path = _write(tmp_path / "a.png", rgb)
    img = imagefolder.load_image(path, 16)
    assert img.dtype == np.uint8 and img.shape == (16, 16)
    assert img[:, :6].max() == 0 and img[:, 10:].min() == 255


def test_load_image_keeps_pixels_when_already_at_size(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, (12, 12), dtype=np.uint8)
    path = _write(tmp_path / "g.png", gray)
    np.testing.assert_array_equal(imagefolder.load_image(path, 12), gray)


def test_load_images_stacks_in_order(tree: Path) -> None:
    paths = [p for p, _ in imagefolder.scan(tree)]
    batch = imagefolder.load_images(paths, 24)
    assert batch.shape == (3, 24, 24) and batch.dtype == np.uint8
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(batch[i], imagefolder.load_image(p, 24))
    assert imagefolder.load_images([], 24).shape == (0, 24, 24)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "id" / "garbage.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00\x01not a png at all" * 10)
    with pytest.raises(DataError, match="cannot decode image") as info:
        imagefolder.load_image(bad, 16)
    assert str(bad) in str(info.value)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    full = _write(tmp_path / "full.png", np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot decode image") as info:
        imagefolder.load_images([full, cut], 16)
    assert str(cut) in str(info.value)


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot decode image") as info:
        imagefolder.load_image(tmp_path / "gone.jpg", 16)
    assert "gone.jpg" in str(info.value)
