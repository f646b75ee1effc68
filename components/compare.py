"""Compare two or three models on a user's own query and gallery ImageFolders (what `mixbct evaluate` runs).

The query model embeds the queries, the gallery model the gallery: the rows are gallery/gallery, query/gallery and
query/query (old/old, new/old, new/new by default), plus paragon/gallery and paragon/paragon when a paragon is
given, and BCT's criterion with update gain and retention is applied to them (components/evaluate.py).

Identities are matched by folder name. This is open-set data, so a query identity may have no gallery image: its
queries can never be retrieved, so they are left out of top-k and mAP (1:N metrics over queries that have a match)
and kept in TAR@FAR, where they are impostor pairs like any other. Every such identity, every gallery identity
without a query, and every identity folder without an image is reported by its folder name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.data.imagefolder import IMAGE_SUFFIXES, load_images, scan
from components.embed import Embedder, extract, load_embedder
from components.errors import ConfigError, DataError, IncompatibleModel
from components.evaluate import CompatibilityTable, Criterion, compatibility_table, criterion
from components.io import file_sha256
from components.progress import bar

DYNAMIC = -1  # Embedder.image_size of a model that takes any input size
_SHOWN = 20  # names listed in a note; the JSON lists them all


@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison: its role, the name used in every row, and its file."""

    role: str  # "query", "gallery" or "paragon"
    name: str
    path: Path
    option: str  # the command-line option that named it, for messages


@dataclass(frozen=True)
class Identities:
    """Who is where, by folder name."""

    query: list[str]  # identity of each query image, in scan order
    gallery: list[str]
    query_only: list[str]  # query identities with no gallery image
    gallery_only: list[str]  # gallery identities with no query
    empty: dict[str, list[str]]  # "query"/"gallery" -> identity folders that hold no image

    @property
    def shared(self) -> list[str]:
        return sorted(set(self.query) & set(self.gallery))


@dataclass(frozen=True)
class Comparison:
    table: CompatibilityTable
    verdict: Criterion
    models: dict[str, dict[str, Any]]
    image_size: int
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly; "pairs" and "criterion" have the layout of the upgrade's eval/metrics.json."""
        return {
            "models": self.models,
            "image_size": self.image_size,
            "data": self.data,
            "pairs": self.table.to_dict(),
            "criterion": self.verdict.to_dict(),
            "notes": list(self.notes),
        }


def check_names(specs: Sequence[ModelSpec]) -> None:
    """Names become row labels ("new/old") and JSON keys: non-empty, without "/", all different."""
    seen: dict[str, str] = {}
    for s in specs:
        if not s.name.strip() or "/" in s.name:
            raise ConfigError(f"{s.option} {s.name!r}: a model name must be non-empty and contain no '/'")
        if s.name in seen:
            raise ConfigError(f"{seen[s.name]} and {s.option} are both {s.name!r}: give each model its own name")
        seen[s.name] = s.option


def resolve_image_size(models: Sequence[tuple[ModelSpec, Embedder]], requested: int | None) -> int:
    """The models' own input size; `requested` (--image-size) only where every model takes any size."""
    fixed = [(s, e.image_size) for s, e in models if e.image_size != DYNAMIC]
    for (s1, n1), (s2, n2) in zip(fixed, fixed[1:]):
        if n1 != n2:
            raise IncompatibleModel(
                f"{s1.path}: takes {n1}x{n1} inputs but {s2.path} takes {n2}x{n2}: they cannot embed the same images"
            )
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--image-size must be >= 1, got {requested}")
        for s, n in fixed:
            if n != requested:
                raise ConfigError(
                    f"{s.path}: the model takes {n}x{n} inputs but --image-size is {requested}; "
                    f"leave --image-size out to use {n}"
                )
        return requested
    if fixed:
        return fixed[0][1]
    paths = ", ".join(str(s.path) for s, _ in models)
    raise ConfigError(f"{paths}: the models accept any input size; pass --image-size (the size they were trained at)")


def _empty_identity_folders(root: Path, found: set[str]) -> list[str]:
    folders = (p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(name for name in folders if name not in found)


def identities(query_dir: Path, gallery_dir: Path) -> tuple[list[Path], list[Path], Identities]:
    """Scan both folders (an empty or missing one fails naming it) and match identities by folder name."""
    q, g = scan(query_dir), scan(gallery_dir)
    qids, gids = [i for _, i in q], [i for _, i in g]
    ids = Identities(
        query=qids,
        gallery=gids,
        query_only=sorted(set(qids) - set(gids)),
        gallery_only=sorted(set(gids) - set(qids)),
        empty={
            "query": _empty_identity_folders(query_dir, set(qids)),
            "gallery": _empty_identity_folders(gallery_dir, set(gids)),
        },
    )
    if not ids.shared:
        raise DataError(
            f"{query_dir} and {gallery_dir}: no identity folder name appears in both, so no query can be matched "
            "(identities are matched by folder name)"
        )
    return [p for p, _ in q], [p for p, _ in g], ids


def _names(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _notes(ids: Identities, query_dir: Path, gallery_dir: Path) -> list[str]:
    notes = []
    if ids.query_only:
        lost = set(ids.query_only)
        n_q = sum(i in lost for i in ids.query)
        notes.append(
            f"{_count(len(lost), 'query identity has', 'query identities have')} no gallery image: "
            f"{_names(ids.query_only)} (their {_count(n_q, 'query is', 'queries are')} left out of top-k and mAP, "
            "and kept in TAR@FAR as impostors)"
        )
    if ids.gallery_only:
        notes.append(
            f"{_count(len(ids.gallery_only), 'gallery identity has', 'gallery identities have')} no query: "
            f"{_names(ids.gallery_only)} (kept in the gallery as distractors)"
        )
    suffixes = "|".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
    for side, root in (("query", query_dir), ("gallery", gallery_dir)):
        if ids.empty[side]:
            notes.append(
                f"{root}: skipped {_count(len(ids.empty[side]), 'identity folder', 'identity folders')} with no "
                f".({suffixes}) image: {_names(ids.empty[side])}"
            )
    return notes


def compare(
    query: ModelSpec,
    gallery: ModelSpec,
    query_dir: Path,
    gallery_dir: Path,
    paragon: ModelSpec | None = None,
    image_size: int | None = None,
    threads: int = 2,
) -> Comparison:
    """Embed the queries and the gallery with every model and evaluate the pairs (see the module docstring)."""
    specs = [s for s in (query, gallery, paragon) if s is not None]
    check_names(specs)
    embedders = [(s, load_embedder(s.path, threads)) for s in specs]
    by_role = {s.role: e for s, e in embedders}
    for s, e in embedders:
        if s.role != "gallery" and e.dim != by_role["gallery"].dim:
            raise IncompatibleModel(
                f"{s.path}: {e.dim}-d embeddings cannot be compared with {gallery.path}: {by_role['gallery'].dim}-d"
            )
    size = resolve_image_size(embedders, image_size)

    q_paths, g_paths, ids = identities(query_dir, gallery_dir)
    code = {name: i for i, name in enumerate(sorted(set(ids.query) | set(ids.gallery)))}
    yq = np.array([code[i] for i in ids.query])  # [n_q]
    yb = np.array([code[i] for i in ids.gallery])  # [n_g]
    matched = np.isin(yq, yb)  # queries whose identity is in the gallery

    xq_img, xb_img = load_images(q_paths, size), load_images(g_paths, size)  # [n, size, size] uint8
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with bar("embedding", len(embedders) * (len(q_paths) + len(g_paths))) as advance:
        for s, e in embedders:
            try:
                features[s.name] = (extract(e, xq_img, progress=advance), extract(e, xb_img, progress=advance))
            except Exception as err:  # onnxruntime and torch raise their own types; one line instead of 45
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DataError(f"{s.path}: cannot embed {size}x{size} images ({first})") from err

    qn, gn = query.name, gallery.name
    pairs = [(gn, gn), (qn, gn), (qn, qn)]
    if paragon is not None:
        pairs += [(paragon.name, gn), (paragon.name, paragon.name)]
    table = compatibility_table(features, yq, yb, pairs, retrieval_queries=None if matched.all() else matched)
    verdict = criterion(table, new=qn, old=gn, paragon=None if paragon is None else paragon.name)

    models = {
        s.name: {"role": s.role, "path": os.fspath(s.path), "sha256": file_sha256(s.path), "dim": e.dim,
                 "input_size": None if e.image_size == DYNAMIC else e.image_size}
        for s, e in embedders
    }  # fmt: skip
    data = {
        "query_dir": os.fspath(query_dir),
        "gallery_dir": os.fspath(gallery_dir),
        "queries": len(q_paths),
        "gallery": len(g_paths),
        "retrieval_queries": int(matched.sum()),
        "identities": {"query": len(set(ids.query)), "gallery": len(set(ids.gallery)), "shared": len(ids.shared)},
        "query_identities_without_gallery": ids.query_only,
        "gallery_identities_without_query": ids.gallery_only,
        "empty_identity_folders": ids.empty,
    }
    return Comparison(table, verdict, models, size, data, _notes(ids, query_dir, gallery_dir))

