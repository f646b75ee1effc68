"""The embedded default dataset: jittered renderings of KanjiVG stroke data.

An identity is a character (one base-form SVG from the `kanjivg` package); a sample is one rendering of its
strokes with handwriting-like jitter. Sample `i` of a character is drawn from `default_rng([seed, codepoint, i])`,
so any sample can be regenerated alone, in any order, on any machine.

KanjiVG is (C) Ulrich Apel, CC BY-SA 3.0 (https://kanjivg.tagaini.net); renderings are derived works, so they are
made at run time and never committed.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from components.errors import DataError
from components.io import atomic_dir

BOX = 109.0  # KanjiVG's viewBox is 0 0 109 109
_CENTRE = BOX / 2
_TOKEN = re.compile(r"([A-Za-z])|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|([\s,]+)|(.)")
# Commands we can turn into polylines; anything else (Q, T, A) is rejected by name rather than misdrawn.
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Z": 0}
_UNITS_PER_POINT = 2.5  # Bézier sampling step in box units: ~1.5 px at 64 px, so curves look smooth


def package_source() -> Path:
    """The installed `kanjivg` package's folder of SVGs (one per character form)."""
    try:
        folder = Path(str(importlib.metadata.distribution("kanjivg").locate_file("kanji")))
    except importlib.metadata.PackageNotFoundError as e:
        raise DataError("kanjivg: package not installed (pip install kanjivg)") from e
    if not folder.is_dir():
        raise DataError(f"{folder}: kanjivg package has no kanji folder")
    return folder


def _is_base_form(path: Path) -> bool:
    # Variants (e.g. 04e14-Kaisho.svg) are alternative forms of the same identity; only base forms are classes.
    return path.suffix == ".svg" and "-" not in path.stem


def _is_copied(path: Path) -> bool:
    # Base forms (the identities) and their "Kaisho" handwritten-style forms (the shifted evaluation set).
    return _is_base_form(path) or (path.suffix == ".svg" and path.stem.endswith("-Kaisho") and path.stem.count("-") == 1)


def _copy_base_forms(source: Path, dest: Path) -> int:
    """Copy `source`'s base-form SVGs and their Kaisho variants into `dest`, replacing it atomically; returns the
    number of base forms (identities)."""
    files = sorted(p for p in source.iterdir() if _is_copied(p))
    if not any(_is_base_form(p) for p in files):
        raise DataError(f"{source}: no base-form SVG files")
    with atomic_dir(dest) as tmp:
        for p in files:
            shutil.copyfile(p, tmp / p.name)  # bytes only: no mtimes, so the folder hash is deterministic
    return sum(_is_base_form(p) for p in files)


def copy_source(dest: Path) -> int:
    """Copy the package's base-form SVGs (and Kaisho variants) into `dest` atomically, so a pipeline stage can own
    and hash them."""
    return _copy_base_forms(package_source(), Path(dest))


def codepoint(svg_path: Path) -> int:
    """The character's code point, from a file name like `04e00.svg` or `04e14-Kaisho.svg`."""
    stem = Path(svg_path).stem.split("-", 1)[0]
    try:
        return int(stem, 16)
    except ValueError as e:
        raise DataError(f"{svg_path}: file name is not a hex code point") from e


@lru_cache(maxsize=32)
def _bernstein(n: int) -> np.ndarray:
    """[n, 4] cubic Bernstein weights at t = 1/n .. 1 (t = 0 is the previous point)."""
    t = np.arange(1, n + 1, dtype=np.float64) / n
    u = 1 - t
    return np.stack([u**3, 3 * u * u * t, 3 * u * t * t, t**3], axis=1)


def _tokens(d: str, where: str) -> list[str | float]:
    out: list[str | float] = []
    for m in _TOKEN.finditer(d):
        cmd, num, _, junk = m.groups()
        if cmd is not None:
            out.append(cmd)
        elif num is not None:
            out.append(float(num))
        elif junk is not None:
            raise DataError(f"{where}: unexpected character {junk!r} in path data")
    return out


def _path_polylines(d: str, where: str) -> list[np.ndarray]:
    """Polylines ([k, 2] float32) of one SVG path's subpaths; cubic segments sampled every ~2.5 units."""
    tokens = _tokens(d, where)
    polylines: list[np.ndarray] = []
    pts: list[np.ndarray] = []
    cur = np.zeros(2)
    start = np.zeros(2)
    last_ctrl: np.ndarray | None = None  # second control point of the previous cubic, for S's reflection
    cmd = ""
    i = 0

    def flush() -> None:
        if pts:
            polylines.append(np.concatenate(pts).astype(np.float32))
            pts.clear()

    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, str):
            if tok.upper() not in _ARITY:
                raise DataError(f"{where}: unsupported path command {tok!r}")
            cmd = tok
            i += 1
            if cmd in "Zz":
                if pts:
                    pts.append(start[None].copy())
                cur, last_ctrl = start.copy(), None
                continue
        elif not cmd or cmd in "Zz":
            raise DataError(f"{where}: number {tok} without a command")
        n = _ARITY[cmd.upper()]
        args = tokens[i : i + n]
        if len(args) < n or not all(isinstance(a, float) for a in args):
            raise DataError(f"{where}: command {cmd!r} needs {n} numbers")
        i += n
        a = np.asarray(args, dtype=np.float64)
        rel = cmd.islower()
        up = cmd.upper()
        if up == "M":
            flush()
            cur = cur + a if rel else a
            start = cur.copy()
            pts.append(cur[None].copy())
            last_ctrl = None
            cmd = "l" if rel else "L"  # extra pairs after M are implicit line-tos (SVG spec)
            continue
        if not pts:
            pts.append(cur[None].copy())
        if up in "LHV":
            if up == "H":
                end = np.array([cur[0] + a[0] if rel else a[0], cur[1]])
            elif up == "V":
                end = np.array([cur[0], cur[1] + a[0] if rel else a[0]])
            else:
                end = cur + a if rel else a
            pts.append(end[None])
            cur, last_ctrl = end, None
            continue
        if up == "C":
            c = a.reshape(3, 2) + (cur if rel else 0)
            c1, c2, end = c
        else:  # S: first control point mirrors the previous cubic's second one
            c = a.reshape(2, 2) + (cur if rel else 0)
            c2, end = c
            c1 = 2 * cur - last_ctrl if last_ctrl is not None else cur.copy()
        ctrl = np.stack([cur, c1, c2, end])  # [4, 2]
        length = float(np.linalg.norm(np.diff(ctrl, axis=0), axis=1).sum())
        n_pts = min(32, max(2, math.ceil(length / _UNITS_PER_POINT)))
        pts.append(_bernstein(n_pts) @ ctrl)  # [n_pts, 2]
        cur, last_ctrl = end, c2
    flush()
    return polylines


def parse_strokes(svg_path: Path) -> list[np.ndarray]:
    """Each stroke of a KanjiVG file as a float32 polyline [k, 2] in the 109x109 box, in drawing order."""
    try:
        root = ET.parse(svg_path).getroot()
    except OSError as e:
        raise DataError(f"{svg_path}: cannot read file: {e}") from e
    except ET.ParseError as e:
        raise DataError(f"{svg_path}: malformed XML: {e}") from e
    strokes: list[np.ndarray] = []
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] != "path":
            continue
        d = el.get("d")
        if d:
            strokes.extend(_path_polylines(d, f"{svg_path}"))
    if not strokes:
        raise DataError(f"{svg_path}: no strokes (no <path d=...> elements)")
    return strokes


class _Glyph(NamedTuple):
    """All strokes concatenated, so jitter is a few vectorised ops instead of a loop per stroke."""

    xy: np.ndarray  # [N, 2] float64 points in box units, centred on the box centre
    stroke: np.ndarray  # [N] stroke index of each point
    arc: np.ndarray  # [N] position along its stroke, 0 at the start .. 1 at the end
    normal: np.ndarray  # [S, 2] unit normal to each stroke's chord: the direction a stroke bends
    bounds: np.ndarray  # [S + 1] point offsets of each stroke


def _prepare(strokes: list[np.ndarray]) -> _Glyph:
    if not strokes:
        raise ValueError("render: no strokes")
    sizes = np.array([len(s) for s in strokes])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    xy = np.concatenate(strokes).astype(np.float64) - _CENTRE
    stroke = np.repeat(np.arange(len(strokes)), sizes)
    arc = np.empty(len(xy))
    normal = np.empty((len(strokes), 2))
    for k, s in enumerate(strokes):
        seg = np.linalg.norm(np.diff(s, axis=0), axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        arc[bounds[k] : bounds[k + 1]] = cum / cum[-1] if cum[-1] > 0 else 0.0
        chord = (s[-1] - s[0]).astype(np.float64)
        norm = np.hypot(*chord)
        normal[k] = (-chord[1] / norm, chord[0] / norm) if norm > 1e-6 else (0.0, 1.0)
    return _Glyph(xy, stroke, arc, normal, bounds)


# Jitter strengths, in box units (109 = glyph box) unless noted. Tuned so raw-pixel nearest neighbour between two
# renderings of 1,000 characters at 32 px is right ~30% of the time: hard for pixels, learnable for a network.
_STROKE_SHIFT = 1.3  # per-stroke offset std
_STROKE_BEND = 1.8  # per-stroke bend (peak sideways displacement at mid-stroke) std
_WARP = 1.4  # amplitude of the smooth whole-glyph displacement field
_WIDTH = (2.2, 4.6)  # pen width range (KanjiVG draws at 3)
_ROTATE = math.radians(3.5)  # std
_SCALE = (0.90, 1.00)  # per-axis range, of the frame
_SHEAR = 0.06  # std
_SHIFT = 0.02  # std of the global translation, as a fraction of the frame
_MARGIN = 0.03  # fraction of the frame kept clear on every side (and at least one pixel)


def _jitter(g: _Glyph, rng: np.random.Generator, size: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Jittered points in canvas pixels [N, 2] and per-stroke pen widths in canvas pixels [S]."""
    n_strokes = len(g.normal)
    # Per stroke: shift it and bend it sideways by a smooth bump that vanishes at both ends.
    shift = rng.normal(0.0, _STROKE_SHIFT, (n_strokes, 2))
    bend = rng.normal(0.0, _STROKE_BEND, n_strokes)
    xy = g.xy + shift[g.stroke] + (bend[g.stroke] * np.sin(np.pi * g.arc))[:, None] * g.normal[g.stroke]
    # Whole glyph: a low-frequency displacement field (one random plane wave per axis), like an unsteady hand.
    freq = rng.normal(0.0, 1.0, (2, 2)) * (2 * np.pi / BOX)
    phase = rng.uniform(0.0, 2 * np.pi, 2)
    xy = xy + _WARP * np.sin(g.xy @ freq.T + phase)
    # Global affine: rotation x shear x anisotropic scale, then translation.
    theta = rng.normal(0.0, _ROTATE)
    c, s = math.cos(theta), math.sin(theta)
    sx, sy = rng.uniform(*_SCALE, 2)
    shear = rng.normal(0.0, _SHEAR)
    affine = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    canvas = size * scale
    px = canvas / BOX
    out = xy @ (affine.T * px) + canvas / 2 + rng.normal(0.0, _SHIFT * canvas, 2)  # [N, 2]
    width = rng.uniform(*_WIDTH) * rng.uniform(0.85, 1.15, n_strokes) * (px * math.sqrt(sx * sy))  # [S]
    # Keep the whole glyph, pen included, inside the frame: shrink about its centre and slide it in if needed.
    # Margin of at least one output pixel, beyond the rounded pen and its round caps, so edges stay dark.
    pad = math.ceil(width.max()) / 2 + 1 + max(scale, _MARGIN * canvas)
    lo, hi = out.min(axis=0), out.max(axis=0)
    room = canvas - 2 * pad
    extent = (hi - lo).max()
    if extent > room:
        k = room / extent
        mid = (lo + hi) / 2
        out = (out - mid) * k + mid
        width = width * k
        lo, hi = (lo - mid) * k + mid, (hi - mid) * k + mid
    out = out + np.clip(pad - lo, 0, None) - np.clip(hi - (canvas - pad), 0, None)
    return out, width


def _supersample(size: int) -> int:
    # Enough sub-pixels for smooth anti-aliased edges; fewer at large sizes, where drawing cost dominates.
    return 4 if size <= 64 else 2


def _draw(g: _Glyph, rng: np.random.Generator, size: int) -> np.ndarray:
    scale = _supersample(size)
    xy, width = _jitter(g, rng, size, scale)
    img = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(img)
    for k in range(len(width)):
        pts = xy[g.bounds[k] : g.bounds[k + 1]]
        w = max(1, int(round(width[k])))
        draw.line(pts.ravel().tolist(), fill=255, width=w, joint="curve")
        r = w / 2
        for x, y in (pts[0], pts[-1]):  # round pen caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(img.reduce(scale), dtype=np.uint8)  # box filter: anti-aliasing


def render(strokes: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    """One handwriting-like rendering, uint8 [size, size], glyph bright (255) on dark (0)."""
    return _draw(_prepare(strokes), rng, size)


def render_samples(svg_path: Path, seed: int, indices: Sequence[int], size: int) -> np.ndarray:
    """Renderings `indices` of one character, uint8 [len(indices), size, size]; each one reproducible alone."""
    cp = codepoint(svg_path)
    g = _prepare(parse_strokes(svg_path))
    out = np.empty((len(indices), size, size), dtype=np.uint8)
    for j, i in enumerate(indices):
        out[j] = _draw(g, np.random.default_rng([seed, cp, int(i)]), size)
    return out


if __name__ == "__main__":  # `python -m components.data.kanjivg data/kanjivg`: materialise the raw source
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/kanjivg")
    print(f"copied {copy_source(target)} KanjiVG characters (and their Kaisho variant forms) into {target}")
