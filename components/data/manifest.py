"""The dataset manifest: one row per sample, its split and label, and the pixel array that goes with it.

Splits follow method.md's upgrade scenarios. Identities are ordered by a seeded hash, so the same seed gives
the same splits on any machine, and identity sets never depend on file-system order:
- test identities (never trained on) come first, each with a gallery set and a query set of different samples;
- the rest is the training pool; its first `old_fraction` of classes (-class scenarios) or of each class's
  samples (-data scenarios) is the old model's; "open" gives the new model the rest, "extended" all of it.
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
from components.errors import DataError

SPLITS = ("old_train", "new_train", "gallery", "query")
COLUMNS = ["id", "source", "sample", "identity", "split", "label"]


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
) -> pd.DataFrame:
    order = _ordered(cfg.seed, identities)
    if len(order) < cfg.test_identities + 2:
        raise DataError(
            f"{cfg.root}: {len(order)} identities, but data.test_identities={cfg.test_identities} plus at least "
            "2 training identities are needed"
        )
    test, pool = order[: cfg.test_identities], order[cfg.test_identities :]
    if train_limit is not None:
        if len(pool) < train_limit:
            raise DataError(
                f"{cfg.root}: only {len(pool)} identities left for training, data.train_identities={train_limit}"
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
    for ident in test:
        items = identities[ident]
        g = min(cfg.gallery_per_identity, max(1, len(items) - 1))
        rows += [(it.source, it.sample, ident, "gallery") for it in items[:g]]
        rows += [(it.source, it.sample, ident, "query") for it in items[g : g + cfg.query_per_identity]]
    df = pd.DataFrame(rows, columns=["source", "sample", "identity", "split"])
    df["label"] = -1
    for group in (("old_train",), ("new_train",), ("gallery", "query")):
        mask = df["split"].isin(group)
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
    for path in files:
        identities[path.stem] = [Item(str(path), i, path.stem) for i in range(max(cfg.samples_per_identity, n_test))]
    # Training identities use samples [0, samples_per_identity); test identities [0, gallery + query).
    df = _assign(cfg, identities, cfg.train_identities)
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


def build_manifest(cfg: DataConfig) -> pd.DataFrame:
    return kanjivg_manifest(cfg) if cfg.source == "kanjivg" else imagefolder_manifest(cfg)


def decoder(cfg: DataConfig, manifest: pd.DataFrame | None = None) -> Callable[[Path], None]:
    """A function that raises if one raw file cannot be read as this source's format.

    For an ImageFolder with its `manifest`, a `Decoded`: it keeps the pixels it decodes for `materialize`, so
    validation's decode is the only one.
    """
    if cfg.source == "kanjivg":
        from components.data.kanjivg import parse_strokes

        return lambda p: None if parse_strokes(p) else None
    if manifest is not None:
        return Decoded(cfg, manifest)
    from components.data.imagefolder import load_image

    return lambda p: None if load_image(p, cfg.image_size, cfg.max_pixels) is not None else None


class Decoded:
    """Decodes ImageFolder files straight into their manifest rows (one uint8 array, the dataset's size)."""

    def __init__(self, cfg: DataConfig, manifest: pd.DataFrame) -> None:
        self.size, self.max_pixels = cfg.image_size, cfg.max_pixels
        self.images = np.empty((len(manifest), self.size, self.size), dtype=np.uint8)  # [N, H, W]
        self.filled = np.zeros(len(manifest), dtype=bool)
        self.rows = {str(Path(s)): r for s, r in manifest.groupby("source", sort=False).indices.items()}

    def __call__(self, path: Path) -> None:
        from components.data.imagefolder import load_image

        image = load_image(path, self.size, self.max_pixels)
        rows = self.rows.get(str(Path(path)))
        if rows is not None:
            self.images[rows], self.filled[rows] = image, True


def _render_group(args: tuple[str, int, list[int], int]) -> np.ndarray:
    from components.data.kanjivg import render_samples

    source, seed, indices, size = args
    return render_samples(Path(source), seed, indices, size)


def materialize(
    cfg: DataConfig, manifest: pd.DataFrame, workers: int = 2, decoded: Callable[[Path], None] | None = None
) -> np.ndarray:
    """Pixels [N, H, W] uint8 in manifest order: KanjiVG renderings or decoded ImageFolder files.

    `decoded`: the `decoder(cfg, manifest)` validation ran, for this same manifest; what it decoded is reused.
    """
    n, size = len(manifest), cfg.image_size
    if cfg.source == "imagefolder":
        from components.data.imagefolder import load_images

        if isinstance(decoded, Decoded) and decoded.images.shape == (n, size, size):
            images, todo = decoded.images, np.flatnonzero(~decoded.filled)
        else:
            images, todo = np.empty((n, size, size), dtype=np.uint8), np.arange(n)
        sources = manifest["source"].to_numpy()
        images[todo] = load_images([Path(sources[i]) for i in todo], size, cfg.max_pixels)
        return images
    images = np.empty((n, size, size), dtype=np.uint8)
    groups = manifest.groupby("source", sort=True).indices  # source -> row positions
    jobs = [(src, cfg.seed, manifest["sample"].to_numpy()[rows].tolist(), size) for src, rows in groups.items()]
    workers = max(1, min(workers, os.cpu_count() or 1))
    if workers == 1:
        results = map(_render_group, jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_render_group, jobs, chunksize=16)
    for (src, rows), arr in zip(groups.items(), results, strict=True):
        images[rows] = arr
    if workers > 1:
        pool.shutdown()
    return images


def split_rows(manifest: pd.DataFrame, split: str) -> np.ndarray:
    """Row positions of one split, in manifest order (the order of every feature file of that split)."""
    return np.flatnonzero(manifest["split"].to_numpy() == split)


def num_classes(manifest: pd.DataFrame) -> dict[str, int]:
    def count(splits: tuple[str, ...]) -> int:
        return int(manifest.loc[manifest["split"].isin(splits), "identity"].nunique())

    return {"old_train": count(("old_train",)), "new_train": count(("new_train",)), "test": count(("gallery", "query"))}
