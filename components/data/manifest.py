"""The dataset manifest: one row per sample, its split and label, and the pixel array that goes with it.

Splits follow method.md's upgrade scenarios. Identities are ordered by a seeded hash, so the same seed gives
the same splits on any machine, and identity sets never depend on file-system order:
- test identities (never trained on) come first, each with a gallery set and a query set of different samples;
- validation identities are the last `val_identities` of that order: disjoint from training and test, with
  their own gallery and query sets (`val_gallery`, `val_query`). Every choice (a method's weight, SLERP's a, a
  configuration) is made on them; test identities are touched only for the numbers reported;
- the rest is the training pool; its first `old_fraction` of classes (-class scenarios) or of each class's
  samples (-data scenarios) is the old model's; "open" gives the new model the rest, "extended" all of it;
- a shifted evaluation set (`shift_gallery`, `shift_query`): the test identities drawn in another style (KanjiVG's
  handwritten-style "Kaisho" variant forms, for the test characters that have one), as fresh renderings. It
  shares the test labels, so a shifted query can be searched against the in-domain gallery too. The validation
  identities get the same (`val_shift_gallery`, `val_shift_query`): what helps under shift is tried there.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import DataConfig
from components.data.sources import RECORD_SOURCES
from components.errors import DataError

SPLITS = (
    "old_train", "new_train", "gallery", "query", "val_gallery", "val_query", "shift_gallery", "shift_query",
    "val_shift_gallery", "val_shift_query",
)  # fmt: skip
# Label spaces: each group numbers its identities 0..n-1 on its own; shifted rows share the test labels.
LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "old_train": ("old_train",),
    "new_train": ("new_train",),
    "test": ("gallery", "query", "shift_gallery", "shift_query"),
    "val": ("val_gallery", "val_query", "val_shift_gallery", "val_shift_query"),
}
COLUMNS = ["id", "source", "sample", "identity", "split", "label"]
SHIFT_VARIANT = "Kaisho"  # KanjiVG's handwritten-style variant forms: the shifted evaluation set


def _rank(seed: int, name: str) -> str:
    return hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()


def _ordered(seed: int, names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (_rank(seed, n), n))


@dataclass(frozen=True)
class Item:
    source: str
    sample: int
    identity: str


def _assign(
    cfg: DataConfig,
    identities: dict[str, list[Item]],  # identity -> its samples (all of them)
    train_limit: int | None,
    shifted: dict[str, list[Item]] | None = None,  # test identity -> its samples in the shifted style
) -> pd.DataFrame:
    order = _ordered(cfg.seed, identities)
    n_test, n_val = cfg.test_identities, cfg.validation_identities
    if len(order) < n_test + n_val + 2:
        raise DataError(
            f"{cfg.root}: {len(order)} identities, but data.test_identities={n_test}, data.val_identities={n_val} "
            "and at least 2 training identities are needed"
        )
    test, pool = order[:n_test], order[n_test : len(order) - n_val]
    val = order[len(order) - n_val :] if n_val else []
    if train_limit is not None:
        if len(pool) < train_limit:
            raise DataError(
                f"{cfg.root}: only {len(pool)} identities left for training after {n_test} test and {n_val} "
                f"validation identities, data.train_identities={train_limit}"
            )
        pool = pool[:train_limit]
    rows: list[tuple[str, int, str, str]] = []  # source, sample, identity, split
    n_old = max(1, round(cfg.old_fraction * len(pool)))
    old_classes = set(pool[:n_old])
    for ident in pool:
        items = identities[ident]
        if cfg.scenario.endswith("-class"):
            old_items = items if ident in old_classes else []
            new_items = items if (cfg.scenario == "extended-class" or ident not in old_classes) else []
        else:
            k = max(1, round(cfg.old_fraction * len(items)))
            old_items = items[:k]
            new_items = items if cfg.scenario == "extended-data" else items[k:]
        rows += [(it.source, it.sample, ident, "old_train") for it in old_items]
        rows += [(it.source, it.sample, ident, "new_train") for it in new_items]

    def enrol(members: list[str], table: dict[str, list[Item]], prefix: str) -> None:
        for ident in members:
            items = table.get(ident, [])
            if not items:
                continue
            g = min(cfg.gallery_per_identity, max(1, len(items) - 1))
            rows.extend((it.source, it.sample, ident, f"{prefix}gallery") for it in items[:g])
            rows.extend((it.source, it.sample, ident, f"{prefix}query") for it in items[g : g + cfg.query_per_identity])

    enrol(test, identities, "")
    enrol(val, identities, "val_")
    if shifted:
        enrol(test, shifted, "shift_")
        enrol(val, shifted, "val_shift_")
    df = pd.DataFrame(rows, columns=["source", "sample", "identity", "split"])
    df["label"] = -1
    for group in LABEL_GROUPS.values():
        mask = df["split"].isin(group)
        if not mask.any():
            continue
        names = sorted(df.loc[mask, "identity"].unique())
        lookup = {n: i for i, n in enumerate(names)}
        df.loc[mask, "label"] = df.loc[mask, "identity"].map(lookup)
    df["id"] = df["split"] + ":" + df["identity"] + ":" + df["source"].map(lambda s: Path(s).name) + ":" + df[
        "sample"
    ].astype(str)
    return df[COLUMNS].reset_index(drop=True)


def kanjivg_manifest(cfg: DataConfig) -> pd.DataFrame:
    root = Path(cfg.root)
    files = sorted(p for p in root.glob("*.svg") if "-" not in p.stem) if root.is_dir() else []
    if not files:
        raise DataError(f"{root}: no KanjiVG SVG files (run `make data` to copy them from the kanjivg package)")
    n_test = cfg.gallery_per_identity + cfg.query_per_identity
    identities: dict[str, list[Item]] = {}
    shifted: dict[str, list[Item]] = {}
    for path in files:
        identities[path.stem] = [Item(str(path), i, path.stem) for i in range(max(cfg.samples_per_identity, n_test))]
        variant = path.with_name(f"{path.stem}-{SHIFT_VARIANT}.svg")
        if cfg.shift_style == "kaisho" and variant.is_file():
            # Rendering indices after the test ones: new draws of the jitter, not the in-domain samples' twins.
            shifted[path.stem] = [Item(str(variant), n_test + i, path.stem) for i in range(n_test)]
    if cfg.shift_style == "kaisho" and not shifted:
        raise DataError(f"{root}: no *-{SHIFT_VARIANT}.svg variant forms for the shifted set (`make data` copies them from the kanjivg package, or "
                        "set data.shift: none)")  # fmt: skip
    # Training identities use samples [0, samples_per_identity); test identities [0, gallery + query).
    df = _assign(cfg, identities, cfg.train_identities, shifted)
    train = df["split"].isin(["old_train", "new_train"])
    return df[~train | (df["sample"] < cfg.samples_per_identity)].reset_index(drop=True)


def imagefolder_manifest(cfg: DataConfig) -> pd.DataFrame:
    from components.data.imagefolder import scan

    identities: dict[str, list[Item]] = {}
    for path, ident in scan(Path(cfg.root)):
        identities.setdefault(ident, []).append(Item(str(path), 0, ident))
    for ident, items in identities.items():  # seeded, not alphabetical, order of each identity's images
        identities[ident] = sorted(items, key=lambda it: (_rank(cfg.seed, it.source), it.source))
    return _assign(cfg, identities, None)


def record_manifest(cfg: DataConfig) -> pd.DataFrame:
    """A RecordIO set or WebDataset shards, listed from their index (components.data.sources.record_items)."""
    from components.data.sources import record_items

    identities: dict[str, list[Item]] = {}
    for source, sample, ident in record_items(cfg.source, cfg.root):
        identities.setdefault(ident, []).append(Item(source, sample, ident))
    for ident, items in identities.items():  # seeded, not storage, order; by file name and key, never the folder
        identities[ident] = sorted(items, key=lambda it: (_rank(cfg.seed, f"{Path(it.source).name}:{it.sample}"), it.sample))
    return _assign(cfg, identities, None)


def build_manifest(cfg: DataConfig) -> pd.DataFrame:
    if cfg.source == "kanjivg":
        return kanjivg_manifest(cfg)
    if cfg.source == "imagefolder":
        return imagefolder_manifest(cfg)
    return record_manifest(cfg)


def stored_shape(cfg: DataConfig, n: int) -> tuple[int, ...]:
    """Shape of the stored images.npy: [n, size, size] (grayscale) or [n, size, size, 3] (RGB)."""
    return (n, cfg.image_size, cfg.image_size) + ((3,) if cfg.channels == 3 else ())


def decoder(cfg: DataConfig, manifest: pd.DataFrame | None = None, out: Path | None = None) -> Callable[[Path], None]:
    """A function that raises if one raw file cannot be read as this source's format.

    For an ImageFolder with its `manifest` and an `out` file, a `Decoded`: it writes the pixels it decodes into
    `out` (the stored images.npy) for `materialize`, so validation's decode is the only one.
    """
    if cfg.source == "kanjivg":
        from components.data.kanjivg import parse_strokes

        return lambda p: None if parse_strokes(p) else None
    if manifest is not None and cfg.source in RECORD_SOURCES:
        return RecordCheck(cfg, manifest, out if cfg.storage == "array" else None)
    if manifest is not None and out is not None and cfg.storage == "array":
        return Decoded(cfg, manifest, out)
    from components.data.imagefolder import load_image

    return lambda p: None if load_image(p, cfg.image_size, cfg.max_pixels, cfg.channels) is not None else None


class Decoded:
    """Decodes ImageFolder files straight into their rows of the stored images.npy (written, never held whole)."""

    def __init__(self, cfg: DataConfig, manifest: pd.DataFrame, out: Path) -> None:
        from components.data.store import ArrayWriter

        self.size, self.max_pixels, self.channels, self.out = cfg.image_size, cfg.max_pixels, cfg.channels, Path(out)
        self.shape = stored_shape(cfg, len(manifest))
        self.writer = ArrayWriter(out, self.shape)
        self.filled = np.zeros(len(manifest), dtype=bool)
        self.rows = {str(Path(s)): r for s, r in manifest.groupby("source", sort=False).indices.items()}

    def __call__(self, path: Path) -> None:
        from components.data.imagefolder import load_image

        image = load_image(path, self.size, self.max_pixels, self.channels)
        rows = self.rows.get(str(Path(path)))
        if rows is not None:
            self.writer.write(rows, np.broadcast_to(image, (len(rows), *image.shape)))
            self.filled[rows] = True


class RecordCheck:
    """Validation's check of one record container (a .rec, a shard): its rows were listed from its index and
    headers; with an `out` file (data.store: array) every row is decoded into it, else a seeded sample of
    data.verify_decode rows is decoded and dropped (training decodes the rest when it reads them)."""

    def __init__(self, cfg: DataConfig, manifest: pd.DataFrame, out: Path | None) -> None:
        from components.data.store import ArrayWriter

        self.cfg, self.out = cfg, out
        self.rows = manifest.groupby("source", sort=False).indices  # source -> row positions
        self.samples = manifest["sample"].to_numpy()
        self.shape = stored_shape(cfg, len(manifest))
        self.writer = ArrayWriter(out, self.shape) if out is not None else None
        self.filled = np.zeros(len(manifest), dtype=bool)

    def __call__(self, path: Path) -> None:
        from components.data.sources import decode_rows

        rows = self.rows.get(str(path))
        if rows is None:
            return
        if self.writer is None:
            k = min(len(rows), self.cfg.verify_decode)
            rows = np.sort(np.random.default_rng([self.cfg.seed, len(rows)]).choice(rows, size=k, replace=False))
        for block in np.array_split(rows, max(1, len(rows) // 1024)):
            pixels = decode_rows(self.cfg.source, [str(path)] * len(block), self.samples[block], self.cfg.image_size,
                                 self.cfg.channels, self.cfg.max_pixels)  # fmt: skip
            if self.writer is not None:
                self.writer.write(block, pixels)
                self.filled[block] = True


def _render_group(args: tuple[str, int, list[int], int]) -> np.ndarray:
    from components.data.kanjivg import render_samples

    source, seed, indices, size = args
    return render_samples(Path(source), seed, indices, size)


def materialize(
    cfg: DataConfig,
    manifest: pd.DataFrame,
    out: Path,
    workers: int = 2,
    decoded: Callable[[Path], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path | None:
    """Write the stored pixels, uint8 in manifest order, to `out` (an .npy): KanjiVG renderings or decoded
    ImageFolder files, row block by row block, never the whole dataset in memory.

    `decoded`: the `decoder(cfg, manifest, out)` validation ran, for this same manifest and file; what it decoded
    is kept and only the rest is decoded here.
    """
    from components.data.store import ArrayWriter

    n = len(manifest)
    if cfg.storage == "source":
        if progress is not None:
            progress(n)
        return None  # nothing stored: every read decodes from the raw source (components.data.store.SourceRows)
    if cfg.source in RECORD_SOURCES:
        from components.data.sources import decode_rows

        check = decoded if isinstance(decoded, RecordCheck) and decoded.writer is not None else None
        writer = check.writer if check is not None else ArrayWriter(out, stored_shape(cfg, n))
        todo = np.flatnonzero(~check.filled) if check is not None else np.arange(n)
        if progress is not None:
            progress(n - len(todo))
        sources, samples = manifest["source"].to_numpy(), manifest["sample"].to_numpy()
        with writer:
            for block in np.array_split(todo, max(1, len(todo) // 1024)) if len(todo) else []:
                writer.write(block, decode_rows(cfg.source, sources[block], samples[block], cfg.image_size, cfg.channels,
                                                cfg.max_pixels))  # fmt: skip
                if progress is not None:
                    progress(len(block))
        return Path(out)
    if cfg.source == "imagefolder":
        from components.data.imagefolder import load_image

        if isinstance(decoded, Decoded) and decoded.out == Path(out) and decoded.shape == stored_shape(cfg, n):
            writer, todo = decoded.writer, np.flatnonzero(~decoded.filled)
            if progress is not None:
                progress(n - len(todo))
        else:
            writer, todo = ArrayWriter(out, stored_shape(cfg, n)), np.arange(n)
        sources = manifest["source"].to_numpy()
        with writer:
            for i in todo:
                writer.write(np.array([i]), load_image(Path(sources[i]), cfg.image_size, cfg.max_pixels, cfg.channels)[None])
                if progress is not None:
                    progress(1)
        return Path(out)
    groups = manifest.groupby("source", sort=True).indices  # source -> row positions
    jobs = [(src, cfg.seed, manifest["sample"].to_numpy()[rows].tolist(), cfg.image_size) for src, rows in groups.items()]
    workers = max(1, min(workers, os.cpu_count() or 1))
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    results = pool.map(_render_group, jobs, chunksize=16) if pool is not None else map(_render_group, jobs)
    with ArrayWriter(out, stored_shape(cfg, n)) as writer:
        for rows, arr in zip(groups.values(), results, strict=True):  # results stream in job order
            if cfg.channels == 3:
                arr = np.repeat(arr[..., None], 3, axis=3)  # renderings are grayscale: RGB repeats the plane
            writer.write(rows, arr)
            if progress is not None:
                progress(len(rows))
    if pool is not None:
        pool.shutdown()
    return Path(out)


def split_rows(manifest: pd.DataFrame, split: str) -> np.ndarray:
    """Row positions of one split, in manifest order (the order of every feature file of that split)."""
    return np.flatnonzero(manifest["split"].to_numpy() == split)


def num_classes(manifest: pd.DataFrame) -> dict[str, int]:
    def count(splits: tuple[str, ...]) -> int:
        return int(manifest.loc[manifest["split"].isin(splits), "identity"].nunique())

    return {group: count(splits) for group, splits in LABEL_GROUPS.items()}
