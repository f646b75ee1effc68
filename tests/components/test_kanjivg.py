"""The embedded KanjiVG dataset: parsing, reproducible jittered rendering, and copying the source files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.data import kanjivg
from components.errors import DataError
from components.io import tree_sha256

SVG_HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.0//EN" "http://www.w3.org/TR/2001/REC-SVG-20010904/DTD/svg10.dtd" [
<!ATTLIST g
xmlns:kvg CDATA #FIXED "http://kanjivg.tagaini.net"
kvg:element CDATA #IMPLIED >
<!ATTLIST path
xmlns:kvg CDATA #FIXED "http://kanjivg.tagaini.net"
kvg:type CDATA #IMPLIED >
]>
"""


def _svg(tmp_path: Path, name: str, paths: list[str]) -> Path:
    body = "".join(f'<path id="s{i}" kvg:type="x" d="{d}"/>\n' for i, d in enumerate(paths))
    text = (
        SVG_HEADER
        + '<svg xmlns="http://www.w3.org/2000/svg" width="109" height="109" viewBox="0 0 109 109">\n'
        + f'<g id="kvg:StrokePaths" kvg:element="x">\n{body}</g>\n</svg>\n'
    )
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ai() -> Path:
    """愛 (U+611B): 13 strokes, curves and straight lines."""
    return kanjivg.package_source() / "0611b.svg"


def test_package_source_holds_base_and_variant_forms() -> None:
    src = kanjivg.package_source()
    assert (src / "04e00.svg").is_file()
    assert any("-" in p.stem for p in src.glob("*.svg"))


def test_codepoint_ignores_variant_suffix() -> None:
    assert kanjivg.codepoint(Path("0611b.svg")) == ord("愛")
    assert kanjivg.codepoint(Path("x/04e14-Kaisho.svg")) == 0x4E14
    with pytest.raises(DataError, match="notes.svg"):
        kanjivg.codepoint(Path("notes.svg"))


def test_parse_strokes_one_polyline_per_stroke_inside_box(ai: Path) -> None:
    strokes = kanjivg.parse_strokes(ai)
    assert len(strokes) == 13
    for s in strokes:
        assert s.dtype == np.float32 and s.ndim == 2 and s.shape[1] == 2 and len(s) >= 2
        assert (s >= 0).all() and (s <= kanjivg.BOX).all()


def _cubic(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    u = (1 - t)[:, None]
    t = t[:, None]
    return u**3 * p[0] + 3 * u * u * t * p[1] + 3 * u * t * t * p[2] + t**3 * p[3]


def test_parse_strokes_matches_hand_computed_bezier(tmp_path: Path) -> None:
    # A cubic from (10,10) to (40,10); relative `s` continues it, its first control point mirroring (30,20).
    path = _svg(tmp_path, "00041.svg", ["M10,10C20,0 30,20 40,10s10-10,20,0"])
    (s,) = kanjivg.parse_strokes(path)
    t = np.linspace(0, 1, 20001)
    first = _cubic(np.array([[10, 10], [20, 0], [30, 20], [40, 10]], dtype=float), t)
    second = _cubic(np.array([[40, 10], [50, 0], [50, 0], [60, 10]], dtype=float), t)
    reference = np.concatenate([first, second])
    np.testing.assert_allclose(s[0], [10, 10])
    np.testing.assert_allclose(s[-1], [60, 10], atol=1e-5)
    # Every sample lies on the true curve, and the samples cover both segments (the curve's peaks are reached).
    off_curve = np.min(np.linalg.norm(s[:, None] - reference[None, ::10], axis=2), axis=1)
    assert off_curve.max() < 0.01
    assert abs(s[:, 1].min() - reference[:, 1].min()) < 0.2
    assert abs(s[:, 1].max() - reference[:, 1].max()) < 0.2
    # Consecutive samples are close: smooth at 64 px (109 units -> 64 px).
    assert np.linalg.norm(np.diff(s, axis=0), axis=1).max() * 64 / 109 < 2.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("<svg><path d='M1,1c", "malformed XML"),
        ('<svg xmlns="http://www.w3.org/2000/svg"><g/></svg>', "no strokes"),
        ('<svg xmlns="http://www.w3.org/2000/svg"><path d="M1,1Q2,2,3,3"/></svg>', "unsupported path command 'Q'"),
        ('<svg xmlns="http://www.w3.org/2000/svg"><path d="M1,1c2,2"/></svg>', "needs 6 numbers"),
    ],
)
def test_parse_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "0611b.svg"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        kanjivg.parse_strokes(bad)
    assert str(bad) in str(info.value)


def test_parse_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read") as info:
        kanjivg.parse_strokes(tmp_path / "nope.svg")
    assert "nope.svg" in str(info.value)


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_bright_glyph_on_dark_inside_frame(ai: Path, size: int) -> None:
    strokes = kanjivg.parse_strokes(ai)
    for seed in range(20):
        img = kanjivg.render(strokes, np.random.default_rng(seed), size)
        assert img.dtype == np.uint8 and img.shape == (size, size)
        assert img.max() >= 192  # ink (a thin pen at 32 px may not fully cover any pixel)
        assert 0.05 < (img > 0).mean() < 0.6  # ink, but mostly background
        edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert edge.max() == 0, "glyph touches the frame"
        assert len(np.unique(img)) > 2  # anti-aliased, not binary


def test_render_stays_in_frame_for_a_glyph_filling_the_box(tmp_path: Path) -> None:
    # A square right at the box edges: only the fit-to-frame step keeps it whole.
    path = _svg(tmp_path, "025a1.svg", ["M0,0L109,0L109,109L0,109Z"])
    strokes = kanjivg.parse_strokes(path)
    for seed in range(20):
        img = kanjivg.render(strokes, np.random.default_rng(seed), 32)
        edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert edge.max() == 0


def test_render_samples_reproducible_and_order_independent(ai: Path) -> None:
    a = kanjivg.render_samples(ai, seed=7, indices=[0, 1, 2, 3], size=32)
    assert a.shape == (4, 32, 32) and a.dtype == np.uint8
    again = kanjivg.render_samples(ai, seed=7, indices=[0, 1, 2, 3], size=32)
    np.testing.assert_array_equal(a, again)
    # Any sample alone, or in another order, is the same array.
    np.testing.assert_array_equal(kanjivg.render_samples(ai, 7, [2], 32)[0], a[2])
    np.testing.assert_array_equal(kanjivg.render_samples(ai, 7, [3, 0], 32), a[[3, 0]])
    # Different indices and different seeds give different renderings.
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(a[i], a[j])
    assert not np.array_equal(kanjivg.render_samples(ai, 8, [0], 32)[0], a[0])


def test_render_samples_uses_documented_rng(ai: Path) -> None:
    strokes = kanjivg.parse_strokes(ai)
    expected = kanjivg.render(strokes, np.random.default_rng([5, 0x611B, 3]), 32)
    np.testing.assert_array_equal(kanjivg.render_samples(ai, 5, [3], 32)[0], expected)


def test_renderings_of_one_character_are_closer_than_of_two() -> None:
    # Jitter must keep identity: on average a character's renderings resemble each other more than another's.
    src = kanjivg.package_source()
    chars = ["04e00", "0611b", "05b57", "06f22", "053e3", "05c71", "05ddd", "06728"]
    x = np.stack([kanjivg.render_samples(src / f"{c}.svg", 0, [0, 1], 32) for c in chars]).astype(np.float64)
    x = x.reshape(len(chars), 2, -1)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    sim = x[:, 1] @ x[:, 0].T  # [query, gallery]
    assert np.diag(sim).mean() > sim[~np.eye(len(chars), dtype=bool)].mean() + 0.1
    assert (sim.argmax(axis=1) == np.arange(len(chars))).mean() >= 0.5


def test_copy_base_forms_keeps_kaisho_skips_other_variants_and_replaces_dest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ["04e00.svg", "04e14.svg", "04e14-Kaisho.svg", "04e14-KaishoVtLst.svg", "04e00-HzFst.svg", "notes.txt"]:
        (src / name).write_text(name)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.svg").write_text("old")
    assert kanjivg._copy_base_forms(src, dest) == 2  # identities: base forms only
    assert sorted(p.name for p in dest.iterdir()) == ["04e00.svg", "04e14-Kaisho.svg", "04e14.svg"]
    assert (dest / "04e14.svg").read_text() == "04e14.svg"
    assert not list(tmp_path.glob(".out.*")), "temp folder left behind"


def test_copy_base_forms_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ["04e00.svg", "0611b.svg"]:
        (src / name).write_bytes((kanjivg.package_source() / name).read_bytes())
    kanjivg._copy_base_forms(src, tmp_path / "a")
    kanjivg._copy_base_forms(src, tmp_path / "b")
    assert tree_sha256(tmp_path / "a") == tree_sha256(tmp_path / "b")


def test_copy_source_copies_every_base_form(tmp_path: Path) -> None:
    src = kanjivg.package_source()
    n = kanjivg.copy_source(tmp_path / "kanji")
    copied = sorted(p.name for p in (tmp_path / "kanji").iterdir())
    base = [name for name in copied if "-" not in name]
    assert n == len(base) > 6000
    assert base == sorted(p.name for p in src.glob("*.svg") if "-" not in p.stem)
    assert [name for name in copied if "-" in name] == sorted(p.name for p in src.glob("*-Kaisho.svg"))
    assert (tmp_path / "kanji" / "0611b.svg").read_bytes() == (src / "0611b.svg").read_bytes()
