"""The upgrade's steps as plain functions: one per DVC stage and per Prefect task.

Each reads its inputs from, and writes its outputs under, a `Paths` work folder, and returns a small
JSON-friendly summary (paths, hashes, numbers), never tensors. Outputs are written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from components.config import Config, DataConfig, EvaluateConfig, ExtractConfig, LegacyConfig, OldConfig, TrainConfig
from components.errors import ConfigError, DataError
from components import keys
from components.io import atomic_dir, atomic_path, file_sha256, save_npy, tree_sha256, write_json, write_text
from components.paths import Paths
from components.preprocess import Preprocess
from components.progress import bar

if TYPE_CHECKING:
    from components.data.store import Rows
    from components.embed import Embedder

# ----------------------------------------------------------------------------------------------- data


def set_threads(n: int) -> None:
    """torch and faiss each bring OpenMP: pin both (stack-notes)."""
    torch.set_num_threads(n)
    from components.evaluate import set_threads as faiss_threads

    faiss_threads(n)


def load_manifest(paths: Paths, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The dataset manifest, or only some of its columns (at millions of rows a column of paths costs ~100 MB)."""
    if not paths.manifest.is_file():
        raise DataError(f"{paths.manifest}: dataset manifest not found (run the prepare stage first)")
    try:
        return pd.read_csv(paths.manifest, dtype={"identity": str, "source": str, "id": str, "split": str},
                           usecols=list(columns) if columns is not None else None)  # fmt: skip
    except ValueError as err:  # a column asked for is missing
        raise DataError(f"{paths.manifest}: {err}") from None


def load_images(paths: Paths, manifest: pd.DataFrame | None = None) -> Rows:
    """Every image of the dataset, as a lazy view (components.data.store): rows are read when indexed, from the
    stored images.npy or, for data.store: source, decoded from the raw files the manifest names."""
    from components.data.store import ImageRows, SourceRows

    store = _store(paths)
    if store and store.get("kind") == "source":
        manifest = load_manifest(paths) if manifest is None else manifest  # a caller's copy: read the CSV once
        return SourceRows(store["source"], manifest["source"].to_numpy(), manifest["sample"].to_numpy(),
                          int(store["image_size"]), int(store["channels"]), int(store["max_pixels"]))  # fmt: skip
    if not paths.images.is_file():
        raise DataError(f"{paths.images}: stored images not found (run the prepare stage first)")
    return ImageRows(paths.images)


def _store(paths: Paths) -> dict[str, Any] | None:
    summary = paths.dataset / "summary.json"
    return json.loads(summary.read_text()).get("store") if summary.is_file() else None


def split_arrays(paths: Paths, split: str) -> tuple[Rows, np.ndarray]:
    """(images, labels [n]) of one split, in manifest order; images is a lazy uint8 view [n, H, W(, 3)]: index it
    (a slice, an int, positions) to read pixels."""
    from components.data.manifest import split_rows

    store = _store(paths)
    columns = ("split", "label") + (("source", "sample") if store and store.get("kind") == "source" else ())
    manifest = load_manifest(paths, columns)
    rows = split_rows(manifest, split)
    return load_images(paths, manifest).subset(rows), manifest["label"].to_numpy()[rows].astype(np.int64)


def stored_preprocess(paths: Paths) -> Preprocess:
    """The default input of the project's own models: the stored images' size and channels, in [-1, 1]."""
    from components.preprocess import default_preprocess

    shape = load_images(paths).shape  # [N, H, W] or [N, H, W, 3]
    return default_preprocess(int(shape[1]), 1 if len(shape) == 3 else int(shape[3]))


def model_preprocess(declared: Preprocess | None, paths: Paths) -> Preprocess:
    return declared if declared is not None else stored_preprocess(paths)


def prepare(cfg: DataConfig, paths: Paths, workers: int = 2) -> dict[str, Any]:
    """Manifest -> Great Expectations suite -> pixels. A failed expectation stops here, before any training."""
    from components.data.manifest import build_manifest, decoder, materialize, num_classes
    from components.validation import validate_manifest

    manifest = build_manifest(cfg)
    classes = num_classes(manifest)
    with atomic_dir(paths.dataset) as tmp:
        # The decoder writes what it decodes straight into tmp/images.npy: each image is decoded once, here, and
        # the dataset is never held in memory. A failed expectation discards the folder.
        decode = decoder(cfg, manifest, tmp / "images.npy")
        report = validate_manifest(
            manifest,
            classes,
            decode=decode,
            source_name=cfg.root,
            report_path=paths.reports / "data_validation.md",
            shared_train_samples=cfg.scenario.startswith("extended"),
        )
        report.raise_for_failure(paths.reports / "data_validation.md")
        with bar("render dataset" if cfg.source == "kanjivg" else "load images", len(manifest)) as advance:
            materialize(cfg, manifest, tmp / "images.npy", workers=workers, decoded=decode, progress=advance)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        summary: dict[str, Any] = {"rows": len(manifest), "classes": classes, "splits": _split_counts(manifest)}
        if cfg.storage == "source":  # how every later stage decodes a row (components.data.store.SourceRows)
            summary["store"] = {"kind": "source", "source": cfg.source, "image_size": cfg.image_size,
                                "channels": cfg.channels, "max_pixels": cfg.max_pixels}  # fmt: skip
        write_json(tmp / "summary.json", summary)
    return {"manifest": str(paths.manifest), "rows": len(manifest), "classes": classes}


def check_inputs(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Every check that needs no training, before any stage writes anything (only validation reports are written).

    The splits against the batch sizes (training drops the last partial batch, so a split smaller than one batch
    would train on nothing), and a user's old model and gallery: readable, the embedding and input sizes agree
    with params, one finite, well-scaled row per gallery image (the Great Expectations gallery suite, run on the
    user's file itself, so a rejected gallery is never copied into the work folder).
    """
    from components.data.manifest import build_manifest, split_rows

    manifest = build_manifest(cfg.data)
    counts = _split_counts(manifest)
    sizes = [("train.batch_size", cfg.train.batch_size, "new_train")]
    if cfg.old.model is None:
        sizes.append(("legacy.batch_size", cfg.legacy.batch_size, "old_train"))
    for field, batch, split in sizes:
        if counts.get(split, 0) < batch:
            raise ConfigError(
                f"{field} = {batch} is larger than the {split} split ({counts.get(split, 0)} samples of "
                f"{cfg.data.root} with these data.* params): lower it or add data"
            )
    if cfg.old.model is not None and cfg.old.gallery is not None:
        from components.embed import check_compatible_dims, load_embedder
        from components.validation import validate_embeddings

        embedder = load_embedder(cfg.old.model, threads=cfg.runtime.threads, **old_feed(cfg.old, cfg.data))
        check_compatible_dims(embedder, cfg.train.embedding_dim, name=cfg.old.model)
        gallery_rows = manifest.iloc[split_rows(manifest, "gallery")]
        gallery, _ = _load_gallery_file(Path(cfg.old.gallery), gallery_rows)
        report_path = paths.reports / "user_gallery_validation.md"  # the extract stage re-checks the imported copy
        report = validate_embeddings(
            gallery, cfg.train.embedding_dim, len(gallery_rows), source_name=cfg.old.gallery, suite="user_gallery",
            report_path=report_path,
        )  # fmt: skip
        report.raise_for_failure(report_path)
    return {"rows": len(manifest), "splits": counts}


def _split_counts(manifest: pd.DataFrame) -> dict[str, int]:
    return {k: int(v) for k, v in manifest["split"].value_counts().sort_index().items()}


def data_hash(cfg: DataConfig) -> str:
    """Content hash of the raw data: the root folder or file; a RecordIO's .rec, .idx and property; the shards a
    WebDataset pattern names."""
    import hashlib

    from components.data.sources import recordio_path

    if cfg.source == "recordio":
        rec = recordio_path(cfg.root)
        files = [rec, rec.with_suffix(".idx")] + ([rec.parent / "property"] if (rec.parent / "property").is_file() else [])
    elif cfg.source == "webdataset":
        from components.data.webdataset import expand_shards

        files = expand_shards(cfg.root)
    else:
        return tree_sha256(cfg.root)
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- legacy


def legacy_info(paths: Paths) -> dict[str, Any]:
    info = paths.legacy / "info.json"
    if not info.is_file():
        raise DataError(f"{info}: legacy model not found (run the legacy stage first)")
    return json.loads(info.read_text())


def old_model_path(paths: Paths) -> Path:
    return paths.legacy / legacy_info(paths)["model"]


def gallery_path(paths: Paths) -> Path:
    return paths.legacy / "gallery.npy"


def old_feed(old: OldConfig, data: DataConfig) -> dict[str, Any]:
    """How a user's old model is fed and read (params old.preprocess / old.output / old.pool, data.* as the
    fallback): load_embedder's keyword arguments."""
    from components.preprocess import default_preprocess

    return {"preprocess": old.preprocess, "output": old.output, "pool": old.pool,
            "fallback": default_preprocess(data.image_size, data.channels)}  # fmt: skip


# How the legacy stage embeds the gallery with the old model it trained: in this process, unless a flow installs
# another way (flows/extract.py: shards on a Dask cluster). (model.onnx, gallery images, threads) -> [n, d] float32.
GALLERY_BATCH = 512
_GALLERY_EXTRACTOR: Any = None


def set_gallery_extractor(fn: Any) -> None:
    global _GALLERY_EXTRACTOR
    _GALLERY_EXTRACTOR = fn


def _extract_gallery_here(model: Path, images: Any, threads: int) -> np.ndarray:
    from components.embed import extract, load_embedder

    return extract(load_embedder(model, threads=threads), images, batch_size=GALLERY_BATCH)


def gallery_shards(n: int, shard_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of an n-row gallery in whole batches of GALLERY_BATCH (so every row is embedded in
    the same batch as in one process: bit-identical results)."""
    return _batch_shards(n, GALLERY_BATCH, shard_rows)


def embed_gallery_shard(model: str, images: Any, start: int, stop: int, folder: str, threads: int = 1) -> str:
    """Rows [start, stop) of `images` embedded by `model`, written atomically to `folder` (a Dask task)."""
    set_threads(threads)
    path = Path(folder) / f"{start:012d}-{stop:012d}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = _extract_gallery_here(Path(model), images.subset(np.arange(start, stop)), threads)
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, feats)
    return str(path)


def old_embedder(paths: Paths, threads: int = 2) -> Embedder:
    """The old model as the legacy stage recorded it, fed as it recorded (info.json "feed": the preprocess that
    was resolved for it, its embedding tensor and pooling)."""
    from components.embed import load_embedder
    from components.preprocess import Preprocess

    feed = legacy_info(paths).get("feed") or {}
    pre = Preprocess.from_json(feed["preprocess"]) if feed.get("preprocess") else None
    return load_embedder(old_model_path(paths), threads=threads, preprocess=pre, output=feed.get("output"),
                         pool=feed.get("pool", "none"))  # fmt: skip


def legacy(
    cfg: LegacyConfig,
    old: OldConfig,
    image_size: int,
    paths: Paths,
    threads: int = 2,
    tolerance: float = 1e-4,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """The system a user already has: an old model and the gallery embeddings it wrote.

    With `old.model`/`old.gallery` set, those files are imported as they are; otherwise a small CNN is trained
    on the old split (softmax or ArcFace head) and the gallery is embedded with it; its ONNX export must agree with
    torch within `tolerance` (evaluate.onnx_tolerance, the registration gate's tolerance too).
    """
    from components.embed import export_onnx, load_embedder, model_sha256, onnx_parity, save_backbone

    with atomic_dir(paths.legacy) as out:
        if old.model is not None and old.gallery is not None:
            src = Path(old.model)
            feed = old_feed(old, data if data is not None else DataConfig(image_size=image_size))
            embedder = load_embedder(src, threads=threads, **feed)  # fails early, naming the file, if unreadable
            model_name = _copy_model(src, out)
            from components.data.manifest import split_rows

            manifest = load_manifest(paths)
            gallery, matched = _load_gallery_file(Path(old.gallery), manifest.iloc[split_rows(manifest, "gallery")])
            save_npy(out / "gallery.npy", gallery)
            info = {
                "origin": "imported",
                "model": model_name,
                "source_model": str(src),
                "source_gallery": str(old.gallery),
                "source_gallery_sha256": file_sha256(old.gallery),
                "embedding_dim": embedder.dim,
                # how every later stage feeds it: resolved once, here (params, else its metadata, else data.*)
                "feed": {"preprocess": embedder.preprocess.to_json(), "output": old.output, "pool": old.pool},
                **matched,
            }
        else:
            from components.losses.arcface import ArcFaceHead, SoftmaxHead
            from components.models import build_backbone
            from components.task import ClassifierTask
            from components.train import LoopConfig, TrainArrays, fit

            torch.manual_seed(cfg.seed)
            images, labels = split_arrays(paths, "old_train")
            if len(labels) == 0:
                raise DataError("old_train split is empty: set old.model and old.gallery, or data.old_fraction > 0")
            n_classes = int(labels.max()) + 1
            pre = model_preprocess(cfg.preprocess, paths)
            backbone = build_backbone(cfg.arch, cfg.embedding_dim, pre.square, pre.channels)
            head = SoftmaxHead(cfg.embedding_dim, n_classes) if cfg.head == "softmax" else ArcFaceHead(
                cfg.embedding_dim, n_classes
            )
            loop = LoopConfig(
                epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, seed=cfg.seed,
            )  # fmt: skip
            steps = (len(labels) // cfg.batch_size) * cfg.epochs
            with bar(f"train old model ({cfg.arch}, {cfg.head})", steps) as advance:
                history = fit(
                    ClassifierTask(backbone, head), backbone, TrainArrays(images, labels, preprocess=pre), loop,
                    checkpoint=paths.root / "checkpoints" / f"{keys.legacy_checkpoint(cfg, image_size, file_sha256(paths.manifest))}.pt",
                    progress=lambda s, t: advance(1),
                )  # fmt: skip
            backbone.eval()
            save_backbone(backbone, out / "model.pt", cfg.arch, cfg.embedding_dim, pre.square, pre)
            # The old classifier, by identity: BCT's influence loss uses its rows for the classes it saw.
            weight = head.fc.weight if isinstance(head, SoftmaxHead) else head.weight  # [C_old, d]
            manifest = load_manifest(paths, ("identity", "split", "label"))
            old_rows = manifest[manifest["split"] == "old_train"]
            names = old_rows.groupby("label")["identity"].first().sort_index()
            with atomic_path(out / "head.npz", suffix=".npz") as tmp:
                np.savez(tmp, weight=weight.detach().float().numpy(), identities=names.to_numpy().astype(str),
                         head=np.array(cfg.head))  # fmt: skip
            export_onnx(backbone, out / "model.onnx", pre)
            gallery_images, _ = split_arrays(paths, "gallery")
            parity = onnx_parity(backbone, out / "model.onnx", gallery_images[:64], threads=threads)
            if not parity <= tolerance:  # NaN fails too
                raise RuntimeError(f"{out / 'model.onnx'}: ONNX differs from torch by {parity:.2e} (> {tolerance:g})")
            gallery = (_GALLERY_EXTRACTOR or _extract_gallery_here)(out / "model.onnx", gallery_images, threads)
            save_npy(out / "gallery.npy", gallery)
            write_json(out / "history.json", history)
            _write_history_csv(out / "history.csv", history)
            info = {"origin": "trained", "model": "model.onnx", "embedding_dim": cfg.embedding_dim, "onnx_parity": parity}
        info["model_sha256"] = model_sha256(out / info["model"])
        info["gallery_sha256"] = file_sha256(out / "gallery.npy")
        write_json(out / "info.json", info)
    return info


# What the legacy stage writes itself: an imported model's external data files must not land on these.
_LEGACY_NAMES = frozenset({"model.onnx", "model.pt", "gallery.npy", "info.json", "history.json", "history.csv", "head.npz"})


def _copy_model(src: Path, out: Path) -> str:
    """Copy a user's model into `out` as model.onnx or model.pt (by content, not suffix), with the external data
    files an ONNX model references at the same relative locations; returns the model's file name."""
    from components.embed import model_files, model_format

    name = f"model.{model_format(src)}"
    files = model_files(src)
    shutil.copyfile(src, out / name)
    for f in files[1:]:
        rel = f.relative_to(src.parent)
        if rel.parts[0] in _LEGACY_NAMES:
            raise DataError(f"{src}: external data location {rel.as_posix()!r} clashes with legacy files")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / rel)
    return name


def _image_key(path: str) -> str:
    """An ImageFolder image as `identity/file`: the same whether a path is absolute or relative to data.root."""
    return "/".join(Path(str(path)).parts[-2:])


def _load_gallery_file(path: Path, gallery_rows: pd.DataFrame) -> tuple[np.ndarray, dict[str, Any]]:
    """The user's gallery embeddings as rows in gallery-manifest order (what every later stage reads).

    `.npy`: already in that order (the validation suite checks the row count). `.npz`: `embeddings` [n, d] with
    `paths` (image files) or `ids` (manifest ids) naming each row, any order; rows for images outside the test
    gallery are left out, a gallery image without a row is an error.

    The format is read from the content, not the suffix. An .npz saved under a .npy name is read as an .npz: its
    names say which row is which. A plain array under an .npz name is refused: the user meant keyed rows, and
    taking them in manifest order could pair embeddings with the wrong images without any error.
    """
    import zipfile
    import zlib

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise DataError(f"{path}: cannot read gallery embeddings ({err.strerror or err})") from None
    if magic == b"\x93NUMPY":
        if path.suffix == ".npz":
            raise DataError(f"{path}: a plain .npy array under an .npz name, so no `paths`/`ids` say which image each "
                            "row is; if its rows are in gallery-manifest order, rename it to .npy")  # fmt: skip
        try:
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32), {}
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: cannot read gallery embeddings as a float .npy array ({err})") from None
    if magic.startswith(b"PAR1"):
        embeddings, names, field = _read_parquet_gallery(path)
        return _keyed_rows(path, embeddings, names, field, gallery_rows)
    if not magic.startswith(b"PK\x03\x04"):
        raise DataError(f"{path}: {'an empty file' if not magic else 'neither a .npy, an .npz nor a Parquet file'}, "
                        "not gallery embeddings")  # fmt: skip
    try:
        loaded = np.load(path, allow_pickle=False)  # a zip of .npy arrays, whatever its name
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read gallery embeddings as .npz ({err})") from None
    with loaded:
        if "embeddings" not in loaded.files or not {"paths", "ids"} & set(loaded.files):
            raise DataError(f"{path}: an .npz gallery needs `embeddings` and `paths` or `ids` arrays; it has {sorted(loaded.files)}")
        field = "ids" if "ids" in loaded.files else "paths"
        try:
            embeddings, names = loaded["embeddings"], loaded[field]
        except ValueError as err:
            if "pickle" in str(err):  # object arrays need pickle: refused
                raise DataError(f"{path}: `{field}` must be a string array, not objects ({err})") from None
            raise DataError(f"{path}: a damaged .npz ({err})") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DataError(f"{path}: a damaged .npz ({err})") from None
    return _keyed_rows(path, embeddings, names, field, gallery_rows)


def _read_parquet_gallery(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """A Parquet gallery: column `embeddings` (a list of floats per row) and `ids` or `paths` (strings)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path}: a damaged Parquet file ({err})") from None
    columns = set(table.column_names)
    if "embeddings" not in columns or not {"paths", "ids"} & columns:
        raise DataError(f"{path}: a Parquet gallery needs columns `embeddings` and `ids` or `paths`; it has {sorted(columns)}")
    field = "ids" if "ids" in columns else "paths"
    try:
        rows = table.column("embeddings").to_pylist()
        embeddings = np.asarray(rows, dtype=np.float32) if rows else np.zeros((0, 0), dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: column `embeddings` must hold one list of numbers of the same length per row ({err})") from None
    names = np.asarray([str(n) for n in table.column(field).to_pylist()])
    return embeddings, names, field


def _keyed_rows(
    path: Path, embeddings: np.ndarray, names: np.ndarray, field: str, gallery_rows: pd.DataFrame
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows of `embeddings` named by `names` (manifest ids, or image paths) picked into gallery-manifest order."""
    if embeddings.dtype.kind not in "biuf":
        raise DataError(f"{path}: `embeddings` must hold numbers, not {embeddings.dtype}")
    if embeddings.ndim != 2 or len(names) != len(embeddings):
        raise DataError(f"{path}: `embeddings` {embeddings.shape} and `{field}` ({len(names)}) must have one row per name")
    keys = [str(n) if field == "ids" else _image_key(str(n)) for n in names]
    wanted = list(gallery_rows["id"]) if field == "ids" else [_image_key(s) for s in gallery_rows["source"]]
    if field == "paths" and len(set(wanted)) != len(wanted):
        raise DataError(f"{path}: this dataset's gallery rows are renderings of the same files; key them by `ids`")
    index: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in index:
            raise DataError(f"{path}: `{field}` names {key!r} twice (rows {index[key]} and {i})")
        index[key] = i
    missing = [w for w in wanted if w not in index]
    if missing:
        raise DataError(f"{path}: no embedding for {len(missing)} of the {len(wanted)} gallery images "
                        f"(by `{field}`), e.g. {', '.join(missing[:3])}")  # fmt: skip
    rows = np.asarray([index[w] for w in wanted])
    return np.asarray(embeddings[rows], dtype=np.float32), {"gallery_key": field, "gallery_rows_unused": len(keys) - len(rows)}


def _write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    write_text(path, pd.DataFrame(history).to_csv(index=False))


# ----------------------------------------------------------------------------------------------- extract


def validate_gallery(paths: Paths, embedding_dim: int, suite: str = "legacy_gallery") -> dict[str, Any]:
    """GX suite on the legacy gallery embeddings: shape, finiteness, norms, row count = gallery manifest."""
    from components.data.manifest import split_rows
    from components.validation import validate_embeddings

    gallery = np.load(gallery_path(paths), allow_pickle=False)
    n_gallery = len(split_rows(load_manifest(paths, ("split",)), "gallery"))
    source = legacy_info(paths).get("source_gallery", str(gallery_path(paths)))
    report_path = paths.reports / f"{suite}_validation.md"
    report = validate_embeddings(gallery, embedding_dim, n_gallery, source_name=source, suite=suite, report_path=report_path)
    report.raise_for_failure(report_path)
    return {"suite": suite, "success": report.success, "report": str(report_path)}


def extract_old(cfg: ExtractConfig, embedding_dim: int, image_size: int, paths: Paths, threads: int = 2) -> dict[str, Any]:
    """Old features of every new-training image (dataset order) and MixBCT's credible mask (T = keep)."""
    from components.embed import extract_to_file

    embedder = extract_check(embedding_dim, paths, threads)
    images, labels = split_arrays(paths, "new_train")
    with atomic_dir(paths.old_features) as out:
        # written batch by batch and read back by rows: the features are never held whole (issue "streaming data")
        with bar(f"extract old features ({Path(embedder.source).name})", len(images)) as advance:
            finite = extract_to_file(embedder, images, out / "features.npy", batch_size=cfg.batch_size, progress=advance)
        return _finish_old_features(cfg, embedder.source, out, labels, finite)


def extract_check(embedding_dim: int, paths: Paths, threads: int = 2) -> Embedder:
    """The old model, checked against train.embedding_dim, and its legacy gallery's suite: before any extraction."""
    from components.embed import check_compatible_dims

    embedder = old_embedder(paths, threads=threads)
    check_compatible_dims(embedder, embedding_dim, name=legacy_info(paths).get("source_model"))
    validate_gallery(paths, embedding_dim)
    return embedder


def _finish_old_features(cfg: ExtractConfig, source: str, out: Path, labels: np.ndarray, finite: bool) -> dict[str, Any]:
    from components.credible import credible_mask
    from components.data.store import ArrayRows

    if not finite:
        raise DataError(f"{source}: old model produced non-finite features on the new training set")
    mask = credible_mask(ArrayRows(out / "features.npy"), labels, keep=cfg.credible_keep)
    summary = {"rows": len(labels), "credible": int(mask.sum()), "credible_fraction": float(mask.mean())}
    np.save(out / "credible.npy", mask)
    write_json(out / "summary.json", summary)
    return summary


# Extraction mapped over shards (flows/extract.py runs them on a Dask cluster through Prefect): each shard is a
# whole number of batches, so every batch is the very one single-process extraction runs, and the assembled file
# is the same to the last bit.


def shards_dir(paths: Paths) -> Path:
    return paths.root / "old_features.shards"


def extract_shards(cfg: ExtractConfig, paths: Paths, shard_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the new training set, `shard_rows` rounded down to whole batches (one at least)."""
    return _batch_shards(int(len(split_arrays(paths, "new_train")[1])), cfg.batch_size, shard_rows)


def _batch_shards(n: int, batch: int, shard_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of n rows, `shard_rows` rounded down to whole batches (one at least), so every row is
    embedded in the same batch as in one process."""
    step = max(batch, shard_rows // batch * batch)
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def extract_shard(cfg: ExtractConfig, paths: Paths, start: int, stop: int, threads: int = 1) -> dict[str, Any]:
    """Old features of rows [start, stop) of the new training set, written atomically to the shards folder."""
    from components.embed import extract_to_file

    set_threads(threads)
    embedder = old_embedder(paths, threads=threads)
    images, _ = split_arrays(paths, "new_train")
    folder = shards_dir(paths)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{start:012d}-{stop:012d}.npy"
    with atomic_path(path, suffix=".npy") as tmp:
        finite = extract_to_file(embedder, images.subset(np.arange(start, stop)), tmp, batch_size=cfg.batch_size)
    return {"start": start, "stop": stop, "path": str(path), "finite": finite, "source": str(embedder.source)}


def extract_assemble(cfg: ExtractConfig, paths: Paths, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards, in row order, into old_features/features.npy (block by block), then the credible mask; the
    shards folder is removed once the result is in place."""
    from components.data.store import ArrayRows, ArrayWriter

    _, labels = split_arrays(paths, "new_train")
    shards = sorted(shards, key=lambda sh: sh["start"])
    covered = [(sh["start"], sh["stop"]) for sh in shards]
    bounds = [0, *(b for _, b in covered)]
    if [a for a, _ in covered] != bounds[:-1] or bounds[-1] != len(labels):
        raise DataError(f"{shards_dir(paths)}: shards {covered} do not cover rows 0..{len(labels)} once each")
    first = ArrayRows(shards[0]["path"])
    with atomic_dir(paths.old_features) as out:
        with ArrayWriter(out / "features.npy", (len(labels), first.shape[1]), np.float32) as writer:
            for sh in shards:
                rows = ArrayRows(sh["path"])
                for a in range(0, len(rows), 65_536):
                    writer.write_block(sh["start"] + a, rows[a : a + 65_536])
        summary = _finish_old_features(cfg, shards[0]["source"], out, labels, all(sh["finite"] for sh in shards))
    shutil.rmtree(shards_dir(paths), ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig, image_size: int, paths: Paths, role: str = "new", threads: int = 2) -> dict[str, Any]:
    """Train the new model (role "new": cfg.method) or the paragon (role "paragon": method "none").

    A training-free method (procrustes, slerp, adapter: components/training_free.py) trains no compatibility term:
    its new model is the paragon (same recipe, same checkpoint: trained once) followed by a map fitted on the
    support set, exported as one model."""
    from components.embed import export_onnx, onnx_parity, save_backbone
    from components.training_free import TRAINING_FREE

    if role == "new" and cfg.method in TRAINING_FREE:
        return _train_free(cfg, image_size, paths, threads)
    method_name = cfg.method if role == "new" else "none"
    backbone, history, checkpoint = _fit_backbone(cfg, image_size, paths, role, method_name)
    gallery_images, _ = split_arrays(paths, "gallery")
    pre = model_preprocess(cfg.preprocess, paths)
    with atomic_dir(paths.model_dir(role)) as out:
        save_backbone(backbone, out / "model.pt", cfg.arch, cfg.embedding_dim, pre.square, pre)
        export_onnx(backbone, out / "model.onnx", pre)
        parity = onnx_parity(backbone, out / "model.onnx", gallery_images[:64], threads=threads)
        write_json(out / "history.json", history)
        _write_history_csv(out / "history.csv", history)
        info = {"role": role, "method": method_name, "epochs": cfg.epochs, "onnx_parity": parity, "checkpoint": checkpoint}
        write_json(out / "info.json", info)
    return info


def _paragon_key(cfg: TrainConfig, image_size: int, paths: Paths) -> str:
    return keys.model_checkpoint(cfg, "paragon", image_size, file_sha256(paths.manifest), None)


def _fit_backbone(
    cfg: TrainConfig, image_size: int, paths: Paths, role: str, method_name: str
) -> tuple[torch.nn.Module, list[dict[str, Any]], str]:
    """Train (or resume, or reuse a finished checkpoint of) `role`'s backbone with `method_name`, in eval mode;
    returns it, its history and its checkpoint's name (the model's key)."""
    from components.losses import build_method
    from components.models import build_backbone
    from components.task import CompatibleTask
    from components.data.store import ArrayRows
    from components.train import LoopConfig, TrainArrays, fit

    from components import distributed

    if distributed.should_launch():  # runtime.nproc_per_node > 1: torchrun trains, this process resumes the result
        _launch_fit(cfg, image_size, paths, role, method_name)
    torch.manual_seed(cfg.seed)
    images, labels = split_arrays(paths, "new_train")
    n_classes = int(labels.max()) + 1
    pre = model_preprocess(cfg.preprocess, paths)
    backbone = build_backbone(cfg.arch, cfg.embedding_dim, pre.square, pre.channels)
    method = build_method(
        method_name, embedding_dim=cfg.embedding_dim, num_classes=n_classes, s=cfg.arcface_s, m=cfg.arcface_m,
        seed=cfg.seed, args=cfg.method_args if role == "new" else {},  # the paragon ("none") takes no arguments
    )  # fmt: skip
    old = credible = old_sha256 = None
    if method.needs_old_features:
        old = ArrayRows(paths.old_features / "features.npy")  # a step reads its own rows (os.pread, no memory map)
        credible = np.load(paths.old_features / "credible.npy")
        if old.shape[1] != cfg.embedding_dim:
            from components.errors import IncompatibleModel

            raise IncompatibleModel(
                f"{paths.old_features / 'features.npy'}: old features are {old.shape[1]}-d, "
                f"train.embedding_dim is {cfg.embedding_dim}"
            )
        old_sha256 = file_sha256(paths.old_features / "features.npy")
    checkpoint = keys.model_checkpoint(cfg, role, image_size, file_sha256(paths.manifest), old_sha256)
    loop = LoopConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, hflip=cfg.hflip, augment=cfg.augment, seed=cfg.seed,
    )  # fmt: skip
    if method.accepts_old_classifier:
        rows, known = _old_classifier(paths, n_classes, cfg.embedding_dim)
        if known.any():
            method.set_old_classifier(torch.from_numpy(rows), torch.from_numpy(known))
    task = CompatibleTask(backbone, method)
    steps = (len(labels) // cfg.batch_size) * cfg.epochs
    with bar(f"train {role} ({cfg.arch}, method={method_name})", steps) as advance:
        history = fit(
            task, backbone, TrainArrays(images, labels, old, credible, preprocess=pre), loop,
            checkpoint=paths.root / "checkpoints" / f"{checkpoint}.pt",
            progress=lambda s, t: advance(1),
        )  # fmt: skip
    backbone.eval()
    return backbone, history, checkpoint


def _launch_fit(cfg: TrainConfig, image_size: int, paths: Paths, role: str, method_name: str) -> None:
    """Train `role`'s checkpoint on runtime.nproc_per_node processes (components/distributed.py)."""
    from components import distributed
    from components.device import current_placement

    launch, pl = distributed.current_launch(), current_placement()
    threads = max(1, torch.get_num_threads() // launch.nproc_per_node) if pl.device.type == "cpu" else torch.get_num_threads()
    spec = {
        "train": cfg.model_dump(mode="json"), "image_size": image_size, "root": str(paths.root.resolve()),
        "role": role, "method": method_name, "checkpoint": str(paths.root / "checkpoints"),
        "runtime": {"threads": threads, "device": pl.device.type, "precision": pl.precision,
                    "channels_last": pl.channels_last, "compile": pl.compile, "backend": launch.backend,
                    "sync_batchnorm": launch.sync_batchnorm},
    }  # fmt: skip
    distributed.launch_training(spec, paths.root / "checkpoints" / f"torchrun-{role}.json")


def _old_classifier(paths: Paths, n_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The old head's row for each new-training class whose identity the old model was trained on ([C_new, d],
    known [C_new] bool); nothing known when the old model was brought (no head) or the classes are disjoint
    (open-class)."""
    rows, known = np.zeros((n_classes, dim), dtype=np.float32), np.zeros(n_classes, dtype=bool)
    head = paths.legacy / "head.npz"
    if not head.is_file():
        return rows, known
    with np.load(head, allow_pickle=False) as z:
        weight, identities = z["weight"], z["identities"]
    if weight.shape[1] != dim:
        return rows, known
    index = {name: i for i, name in enumerate(identities.tolist())}
    manifest = load_manifest(paths, ("identity", "split", "label"))
    new_rows = manifest[manifest["split"] == "new_train"]
    for label, name in new_rows.groupby("label")["identity"].first().items():
        if name in index:
            rows[int(label)], known[int(label)] = weight[index[name]], True
    return rows, known


def _torch_features(model: torch.nn.Module, images: Any, preprocess: Preprocess, batch_size: int = 512) -> np.ndarray:
    """Raw embeddings [n, d] float32 of a torch model (eval mode, no grad), in input order."""
    from components.data.store import batches, chunks

    out = []
    with torch.inference_mode():
        for x in batches(images, preprocess, chunks(len(images), batch_size)):
            out.append(model.eval()(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _train_free(cfg: TrainConfig, image_size: int, paths: Paths, threads: int) -> dict[str, Any]:
    """procrustes / slerp / adapter: the paragon's backbone (or, with method_args.base: mixbct, a MixBCT model's)
    plus a map fitted on the support set (the new training
    images, embedded by the paragon and, in the extract stage, by the old model). SLERP's weight, when not fixed,
    is chosen on the validation identities: the a whose top-1 min(new/old − old/old, new/new − old/old) is the
    highest (components.training_free.choose_slerp_weight). Test identities are never read here."""
    from components.embed import export_onnx, load_backbone, onnx_parity, save_composite
    from components.evaluate import retrieval_metrics
    from components.training_free import build_training_free

    paragon = paths.model_dir("paragon")
    info = json.loads((paragon / "info.json").read_text()) if (paragon / "info.json").is_file() else {}
    if cfg.method_args.get("base") == "mixbct":  # shift study: the map sits on a MixBCT model, not the paragon
        base_cfg = cfg.model_copy(update={"method": "mixbct", "method_args": cfg.method_args["base_args"]})
        backbone, history, _ = _fit_backbone(base_cfg, image_size, paths, "new", "mixbct")
    elif info.get("checkpoint") == _paragon_key(cfg, image_size, paths):  # this very paragon, already trained
        backbone, _ = load_backbone(paragon / "model.pt")
        history = json.loads((paragon / "history.json").read_text())
    else:  # trained here under the paragon's checkpoint name: the paragon stage then finds it finished
        backbone, history, _ = _fit_backbone(cfg, image_size, paths, "paragon", "none")
    images, _ = split_arrays(paths, "new_train")
    pre = model_preprocess(cfg.preprocess, paths)
    new_feats = _torch_features(backbone, images, pre)
    old_feats = np.load(paths.old_features / "features.npy")
    old_backbone, old_meta = None, None
    if cfg.method == "slerp":
        old_pt = paths.legacy / "model.pt"
        if not old_pt.is_file():
            raise ConfigError(
                f"train.method slerp runs the old model inside the exported graph and needs it as a torch checkpoint "
                f"({old_pt} is absent: the old model is {old_model_path(paths).name}); use procrustes or adapter"
            )
        old_backbone, old_meta = load_backbone(old_pt)
        from components.embed import meta_preprocess

        if meta_preprocess(old_meta) != pre:
            raise ConfigError(f"train.method slerp runs both models on one input, but the old model takes "
                              f"{meta_preprocess(old_meta).to_json()} and the new one {pre.to_json()}; use procrustes "
                              "or adapter")  # fmt: skip
    score = None
    val_images, val_labels = {}, {}
    for split in ("val_query", "val_gallery"):
        val_images[split], val_labels[split] = split_arrays(paths, split)
    if len(val_labels["val_query"]) and len(val_labels["val_gallery"]):
        old_emb = old_embedder(paths, threads=threads)
        from components.embed import extract

        old_val = {k: extract(old_emb, v) for k, v in val_images.items()}
        new_val = {k: _torch_features(backbone, v, pre) for k, v in val_images.items()}
        yq, yb = val_labels["val_query"], val_labels["val_gallery"]
        base = retrieval_metrics(old_val["val_query"], yq, old_val["val_gallery"], yb, ks=(1,))["top1"]

        def score(feature_map: Any) -> float:
            q = feature_map(new_val["val_query"], old_val["val_query"])
            g = feature_map(new_val["val_gallery"], old_val["val_gallery"])
            cross = retrieval_metrics(q, yq, old_val["val_gallery"], yb, ks=(1,))["top1"] - base
            self_ = retrieval_metrics(q, yq, g, yb, ks=(1,))["top1"] - base
            return float(min(cross, self_))

    if cfg.method == "slerp" and cfg.method_args.get("weight") is None and score is None:
        raise ConfigError("train.method_args.weight: null means chosen on the validation split, but there is none "
                          "(data.val_identities is 0): set a weight or a validation split")  # fmt: skip
    module, fitted = build_training_free(cfg.method, backbone, old_backbone, new_feats, old_feats, cfg.method_args, score)
    from components.embed import _preprocess_entry

    parts = {"new": {"arch": cfg.arch, "embedding_dim": cfg.embedding_dim, "image_size": pre.square,
                     **_preprocess_entry(pre, pre.square)}}  # fmt: skip
    if old_meta is not None:
        parts["old"] = {k: old_meta[k] for k in ("arch", "embedding_dim", "image_size", "preprocess") if k in old_meta}
    gallery_images, _ = split_arrays(paths, "gallery")
    with atomic_dir(paths.model_dir("new")) as out:
        save_composite(module, out / "model.pt", parts)
        export_onnx(module, out / "model.onnx", pre)
        parity = onnx_parity(module, out / "model.onnx", gallery_images[:64], threads=threads)
        write_json(out / "history.json", history)
        _write_history_csv(out / "history.csv", history)
        info = {"role": "new", "method": cfg.method, "epochs": cfg.epochs, "onnx_parity": parity,
                "training_free": fitted, "chosen_on": "validation" if score is not None else None}  # fmt: skip
        write_json(out / "info.json", info)
    return info


# ----------------------------------------------------------------------------------------------- evaluate


# Evaluation sets: name -> (query split, gallery split, what it is). The old model's gallery of the in-domain test set
# is the stored legacy gallery file (what production serves); on the other sets the old model embeds the images.
EVAL_SETS: dict[str, tuple[str, str, str]] = {
    "test": ("query", "gallery", "in-domain test identities: the reported numbers and the gate"),
    "shift_query": ("shift_query", "gallery", "shifted queries (another style) against the in-domain gallery"),
    "shift": ("shift_query", "shift_gallery", "gallery and queries both in the shifted style"),
    "validation": ("val_query", "val_gallery", "validation identities: where every choice is made"),
    "validation_shift": ("val_shift_query", "val_shift_gallery", "validation identities in the shifted style"),
}
CROSS, SELF = ("new/old", "old/old"), ("new/new", "old/old")


def evaluate(cfg: EvaluateConfig, paths: Paths, threads: int = 2) -> dict[str, Any]:
    """The evaluate stage (`_evaluate_stage`) with every search through evaluate.index (exact search restored after)."""
    from components.evaluate import set_index

    set_index(cfg.index, cfg.index_params)
    try:
        return _evaluate_stage(cfg, paths, threads)
    finally:
        set_index()


def _index_report(cfg: EvaluateConfig, features: dict[str, tuple[np.ndarray, np.ndarray]],
                  pairs: list[tuple[str, str]]) -> dict[str, Any] | None:  # fmt: skip
    """With an approximate evaluate.index: per test pair, its recall@1 against exact search on the same queries
    and both throughputs (components.ann); None with exact search."""
    from components.ann import build_index, compare_with_exact, is_exact
    from components.evaluate import _normalized

    if is_exact(cfg.index) and not cfg.index_params:
        return None
    out: dict[str, Any] = {"factory": cfg.index, "params": cfg.index_params, "pairs": {}}
    for q, g in pairs:
        xq, xb = _normalized(features[q][0], "queries"), _normalized(features[g][1], "gallery")  # as the metrics search
        report = compare_with_exact(build_index(xb, cfg.index, cfg.index_params), xq, xb, cfg.index, cfg.index_params)
        out["pairs"][f"{q}/{g}"] = report.as_metrics()
    return out


def _index_markdown(report: dict[str, Any] | None) -> str:
    if report is None:
        return ""
    lines = [f"### Search index: `{report['factory']}` {report['params']}".rstrip(), "",
             "Every metric above searched this approximate index. Against exact search on the same test queries:", "",
             "| pair | recall@1 vs exact | queries/s | exact queries/s |", "|---|---:|---:|---:|"]  # fmt: skip
    for pair, m in report["pairs"].items():
        lines.append(f"| {pair} | {m['index.recall@1']:.4f} | {m['index.qps']:,.0f} | {m['exact.qps']:,.0f} |")
    return "\n".join(lines) + "\n"


def _evaluate_stage(cfg: EvaluateConfig, paths: Paths, threads: int = 2) -> dict[str, Any]:
    """Cross-model tables over old/old, new/old, new/new (+ paragon rows) with paired-bootstrap intervals and
    negative flips, on the in-domain test set, the shifted sets and the validation set; the compatibility
    criterion (on the intervals by default); the partial-backfill curves of the test gallery.

    The old gallery side of the test set is the stored legacy gallery file, exactly what production serves; it is
    never re-embedded. metrics.json keeps the test set's `pairs` and `criterion` at the top (what the gate reads)
    and every other set under `sets`.
    """
    from components.embed import extract, load_embedder
    from components.plots import backfill_png, roc_png, training_png
    from components.stats import backfill_curves

    manifest = load_manifest(paths)
    counts = manifest["split"].value_counts()
    models = {"old": old_embedder(paths, threads=threads)}
    for role in ("new", "paragon"):
        model = paths.model_dir(role) / "model.onnx"
        if model.is_file():
            models[role] = load_embedder(model, threads=threads)
    if "new" not in models:
        raise DataError(f"{paths.model_dir('new') / 'model.onnx'}: new model not found (run the train stage first)")
    pairs = [("old", "old")] + [p for role in ("new", "paragon") if role in models for p in ((role, "old"), (role, role))]
    cache: dict[tuple[str, str], np.ndarray] = {}  # (model, split) -> features

    def feats(model: str, split: str) -> np.ndarray:
        if (model, split) not in cache:
            if model == "old" and split == "gallery":
                cache[model, split] = np.load(gallery_path(paths)).astype(np.float32)
            else:
                cache[model, split] = extract(models[model], split_arrays(paths, split)[0])
        return cache[model, split]

    results: dict[str, dict[str, Any]] = {}
    tables: dict[str, Any] = {}
    for name, (q_split, g_split, _) in EVAL_SETS.items():
        if counts.get(q_split, 0) == 0 or counts.get(g_split, 0) == 0:
            continue  # no shifted set (data.shift: none) or no validation split (data.val_identities: 0)
        yq, yb = split_arrays(paths, q_split)[1], split_arrays(paths, g_split)[1]
        features = {m: (feats(m, q_split), feats(m, g_split)) for m in models}
        if name == "test":
            _validate_new_gallery(paths, features["new"][1], int(counts["gallery"]))
            index = _index_report(cfg, features, pairs)
        tables[name], results[name] = _evaluate_set(cfg, features, yq, yb, pairs, "paragon" in models)
    test = results["test"]
    verdict = _gate_extras(cfg, tables["test"][1], results)
    test["criterion"] = verdict.to_dict()

    yq, yb = split_arrays(paths, "query")[1], split_arrays(paths, "gallery")[1]
    betas = tuple(round(i / cfg.backfill_steps, 10) for i in range(cfg.backfill_steps + 1))
    curves = backfill_curves(feats("new", "query"), yq, feats("old", "gallery"), feats("new", "gallery"), yb,
                             tables["test"][0].rows[("old", "old")], betas=betas, seed=cfg.bootstrap_seed)  # fmt: skip
    backfill = {order: curve.to_dict() for order, curve in curves.items()}
    face = _face_sets(cfg, models, paths)
    with atomic_dir(paths.eval) as out:
        write_json(out / "metrics.json", {
            "pairs": test["pairs"], "criterion": test["criterion"], "bootstrap": test["bootstrap"],
            "backfill": backfill, "sets": {k: v for k, v in results.items() if k != "test"}, "face": face,
            **({"index": index} if index is not None else {}),
        })  # fmt: skip
        from components.face_eval import markdown as face_markdown

        write_text(out / "table.md", _report_markdown(tables, verdict, curves) + "\n" + face_markdown(face)
                   + ("\n" + _index_markdown(index) if index is not None else ""))  # fmt: skip
        write_json(out / "backfill.json", backfill)
        for (q, g), roc in tables["test"][0].rocs.items():
            frame = pd.DataFrame({"fpr": roc["fpr"], "tpr": roc["tpr"]})
            frame["pair"] = f"{q}/{g}"
            _write_history_csv(out / f"roc_{q}_{g}.csv", frame.to_dict("records"))
        roc_png(tables["test"][0].rocs, out / "roc.png")
        backfill_png(curves, tables["test"][0].rows[("old", "old")], out / "backfill.png")
        roles = {"legacy": paths.legacy, "new": paths.model_dir("new"), "paragon": paths.model_dir("paragon")}
        training_png({role: folder / "history.json" for role, folder in roles.items()}, out / "training.png")
    return {"passed": verdict.passed, "reasons": verdict.reasons, "table": str(paths.eval / "table.md")}


def _face_sets(cfg: EvaluateConfig, models: dict[str, Embedder], paths: Paths) -> dict[str, dict[str, Any]]:
    """evaluate.verification (.bin files) and evaluate.ijb, each image decoded at the stored size and channels."""
    from components.data.imagefolder import MAX_PIXELS
    from components.face_eval import ijb_set, verification_set

    if not cfg.verification and cfg.ijb is None:
        return {}
    stored = stored_preprocess(paths)
    size, channels = stored.square, stored.channels
    face: dict[str, dict[str, Any]] = {}
    for path in cfg.verification:
        face[Path(path).stem] = verification_set(path, models, size, channels, MAX_PIXELS)
    if cfg.ijb is not None:
        face[cfg.ijb.name] = ijb_set(cfg.ijb.root, cfg.ijb.images, cfg.ijb.name, models, size, channels, MAX_PIXELS)
    return face


def _evaluate_set(
    cfg: EvaluateConfig,
    features: dict[str, tuple[np.ndarray, np.ndarray]],
    yq: np.ndarray,
    yb: np.ndarray,
    pairs: list[tuple[str, str]],
    paragon: bool,
) -> tuple[tuple[Any, Any, Any], dict[str, Any]]:
    """One evaluation set: the table, the paired bootstrap (every metric, the criterion's two differences, negative
    flips of new/old and new/new against old/old) and the criterion. Returns ((table, criterion, bootstrap), the
    JSON record)."""
    from components.evaluate import compatibility_table, criterion
    from components.stats import bootstrap_intervals, collect_pair_scores, diff_name

    table = compatibility_table(features, yq, yb, pairs)
    scores = collect_pair_scores(features, yq, yb, pairs)
    boot = bootstrap_intervals(
        scores, yq, diffs=[CROSS, SELF], flips=[("old/old", "new/old"), ("old/old", "new/new")],
        n_resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed, level=cfg.confidence,
    )  # fmt: skip
    intervals = {side: {m: (iv.point, iv.lo, iv.hi) for m, iv in boot.differences[diff_name(*d)].items()}
                 for side, d in (("cross", CROSS), ("self", SELF))}  # fmt: skip
    verdict = criterion(table, gate_metrics=cfg.gate_metrics, paragon="paragon" if paragon else None,
                        intervals=intervals, require=cfg.gate_on, level=cfg.confidence)  # fmt: skip
    from components.evaluate import verification_pairs

    record = {"pairs": table.to_dict(), "criterion": verdict.to_dict(), "bootstrap": boot.to_dict(),
              "queries": len(yq), "gallery": len(yb), "identities": int(len(np.unique(yq))),
              "verification_pairs": verification_pairs(yq, yb)}  # fmt: skip
    return (table, verdict, boot), record


def _gate_extras(cfg: EvaluateConfig, verdict: Any, results: dict[str, dict[str, Any]]) -> Any:
    """The test set's criterion plus the optional gates: the shifted set's criterion (evaluate.gate_shift) and a
    bound on new/old's negative flips (evaluate.max_negative_flips)."""
    import dataclasses

    from components.stats import flip_name

    reasons = list(verdict.reasons)
    if cfg.gate_shift:
        shift = results.get("shift")
        if shift is None:
            reasons.append("evaluate.gate_shift: no shifted evaluation set (data.shift is none)")
        elif not shift["criterion"]["passed"]:
            reasons += [f"shifted set: {r}" for r in shift["criterion"]["reasons"]]
    if cfg.max_negative_flips is not None:
        share = results["test"]["bootstrap"]["negative_flips"][flip_name("old/old", "new/old")]["nf_share"]
        if not share["point"] <= cfg.max_negative_flips:
            reasons.append(f"negative flips: {share['point']:.4f} of the queries old/old gets right are wrong under "
                           f"new/old, above evaluate.max_negative_flips = {cfg.max_negative_flips:g}")  # fmt: skip
    return dataclasses.replace(verdict, reasons=reasons, passed=not reasons)


def _report_markdown(tables: dict[str, Any], verdict: Any, curves: dict[str, Any]) -> str:
    """table.md: the test table and gate, its intervals and flips, the backfill curves, then the other sets."""
    table, _, boot = tables["test"]
    parts = [table.markdown(verdict), "", boot.markdown()]
    parts += ["## Partial backfill (test gallery, new queries)", ""]
    parts += [curve.markdown() for curve in curves.values()]
    for name, (q_split, g_split, what) in EVAL_SETS.items():
        if name == "test" or name not in tables:
            continue
        t, v, b = tables[name]
        parts += [f"## {name}: {what} ({q_split} vs {g_split})", "", t.markdown(v), "", b.markdown()]
    return "\n".join(parts)


def _validate_new_gallery(paths: Paths, gallery: np.ndarray, n_gallery: int) -> None:
    from components.validation import validate_embeddings

    report_path = paths.reports / "new_gallery_validation.md"
    report = validate_embeddings(
        gallery, gallery.shape[1] if gallery.ndim == 2 else -1, n_gallery,
        source_name=str(paths.model_dir("new") / "model.onnx"), suite="new_gallery", report_path=report_path,
    )  # fmt: skip
    report.raise_for_failure(report_path)


def input_hashes(cfg: Config) -> dict[str, str]:
    """The raw data's content hash and the upgrade key, hashing the data (possibly large) once."""
    data = data_hash(cfg.data)
    return {"data": data, "upgrade_key": upgrade_key(cfg, data)}


def upgrade_key(cfg: Config, data: str) -> str:
    """Content hash of everything an upgrade depends on (components.keys.upgrade_key), with a user's old model and
    gallery hashed here. Computed before any work, so a scheduled run can tell in seconds that nothing changed."""
    from components.embed import model_sha256

    if cfg.old.model is not None and cfg.old.gallery is not None:
        return keys.upgrade_key(cfg, data, model_sha256(Path(cfg.old.model)), file_sha256(cfg.old.gallery))
    return keys.upgrade_key(cfg, data)


def fingerprint(cfg: Config, data_hash: str, paths: Paths) -> dict[str, str]:
    """Content hashes that identify an upgrade's inputs: params, data, old model, gallery."""
    info = legacy_info(paths)
    return {"params": keys.params_digest(cfg), "data": data_hash, "old_model": info["model_sha256"], "gallery": info["gallery_sha256"]}


# ----------------------------------------------------------------------------------------------- register


def register(cfg: Config, paths: Paths, fingerprint: dict[str, str], extra_metrics: dict[str, float] | None = None) -> dict:
    """Decide (components.gate) and record (components.registry): the criterion stored by `evaluate` and the new
    model's ONNX parity against torch on the first 128 gallery images, with evaluate.onnx_tolerance.

    Every upgrade becomes one MLflow run; a refused one is tagged `registration=refused` with its reasons and
    nothing is registered. A parity above tolerance then also raises UpgradeError: the export is broken, not
    merely incompatible.
    """
    from components import gate, registry
    from components.embed import load_backbone, onnx_parity
    from components.errors import UpgradeError

    verdict = json.loads((paths.eval / "metrics.json").read_text())["criterion"]
    onnx_path = paths.model_dir("new") / "model.onnx"
    backbone, _ = load_backbone(paths.model_dir("new") / "model.pt")
    gallery_images, _ = split_arrays(paths, "gallery")
    parity = onnx_parity(backbone, onnx_path, gallery_images[:128], threads=cfg.runtime.threads)
    decision = gate.decide(verdict, parity, cfg.evaluate.onnx_tolerance)
    out = registry.track_and_register(cfg, paths, fingerprint, decision, legacy_info(paths), extra_metrics)
    if not decision.onnx_ok:
        raise UpgradeError(f"{onnx_path}: not registered: {decision.reason} (MLflow run {out['run_id']})")
    return out
