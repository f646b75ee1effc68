"""insightface verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...): load, write and score them.

Format, from insightface `src/data/lfw2pack.py` (writer) and `recognition/arcface_torch/eval/verification.py`
(`load_bin`, `calculate_roc`): a pickle of `(bins, issame_list)`, `bins` a list of encoded image bytes (JPEG as
read from disk), `issame_list` a list of bools; images 2i and 2i + 1 form pair i. The published files were
written by Python 2 (str, not bytes), so they load with `encoding="bytes"`.

A pickle can run code when loaded, and these files are downloaded from mirrors, so `load_bin` never calls
`pickle.load`: its unpickler refuses every global (no class, no function, hence nothing to call) and the result
must be exactly (list of bytes, list of bool). A .bin that Python 3 wrote with protocol < 3 stores bytes through
the global `_codecs.encode` and is refused too; `write_bin` re-saves one in the form insightface uses.

Scoring follows insightface's protocol: accuracy by 10-fold cross-validation (the threshold that is best on nine
folds is applied to the tenth), plus TAR at fixed FARs from the ROC of all pairs.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

from components.data.recordio import decode_image_bytes
from components.errors import DataError
from components.evaluate import tar_name
from components.io import atomic_path


def _describe(obj: object) -> str:
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)}"
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


class _BinUnpickler(pickle.Unpickler):
    """Builds only plain containers and scalars: every global (class, function) and persistent id is refused,
    so loading a hostile file calls nothing."""

    def __init__(self, file: IO[bytes], path: Path) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as the published files need
        self._path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise DataError(f"{self._path}: the pickle asks for the global {module}.{name}; a verification .bin holds "
                        "only bytes, lists and bools, so it was refused without running anything")  # fmt: skip

    def persistent_load(self, pid: Any) -> NoReturn:
        raise DataError(f"{self._path}: the pickle holds a persistent id ({_describe(pid)}); refused")


def _check(obj: object, path: Path) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled pair (images, issame), found {_describe(obj)}")
    images, issame = obj
    if not isinstance(images, (list, tuple)):
        raise DataError(f"{path}: images: expected a list of encoded image bytes, found {_describe(images)}")
    if not isinstance(issame, (list, tuple)):
        raise DataError(f"{path}: issame: expected a list of bools, found {_describe(issame)}")
    for i, image in enumerate(images):
        if type(image) is not bytes:
            raise DataError(f"{path}: images[{i}]: expected encoded image bytes, found {_describe(image)}")
    for i, same in enumerate(issame):
        if type(same) is not bool:  # insightface's writers store Python bools; 0/1 ints are not accepted
            raise DataError(f"{path}: issame[{i}]: expected a bool, found {_describe(same)}")
    if not issame:
        raise DataError(f"{path}: the verification set holds no pairs")
    if len(images) != 2 * len(issame):
        raise DataError(f"{path}: {len(images)} images for {len(issame)} is-same flags; pair i is images 2i and "
                        "2i + 1, so there must be exactly two images per flag")  # fmt: skip
    return list(images), np.asarray(issame, dtype=bool)


def load_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Encoded images (pair i = images 2i, 2i + 1) and is-same flags bool [n_pairs] of a verification .bin."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: verification set does not exist") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:
        # No code of the file's choosing can run (no globals), so whatever else the unpickler raises
        # (UnpicklingError, EOFError, ValueError, TypeError, MemoryError, ...) means a corrupt or foreign file.
        raise DataError(f"{path}: not a verification .bin pickle ({type(e).__name__}: {e})") from e
    return _check(obj, path)


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write a verification .bin as insightface does (a pickle of (list, list)), protocol 4, atomically."""
    path = Path(path)
    images = list(images)
    flags = [bool(s) for s in issame]
    bad = next((i for i, image in enumerate(images) if not isinstance(image, (bytes, bytearray))), None)
    if bad is not None:
        raise ValueError(f"images[{bad}] is {type(images[bad]).__name__}, expected encoded image bytes")
    if len(images) != 2 * len(flags):
        raise ValueError(f"{len(images)} images for {len(flags)} pairs: expected two images per pair")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(([bytes(image) for image in images], flags), f, protocol=4)
    return path


def decode_bin_images(
    images: Sequence[bytes], size: int | None = None, channels: int = 3, *, source: str | Path = "verification set"
) -> np.ndarray:
    """uint8 [n, H, W, 3] (or [n, H, W] for channels=1), each resized to size x size when `size` is given.

    Without `size` every image must have the first one's size. `source` (the .bin's path) names the file in errors.
    """
    out: np.ndarray | None = None
    for i, data in enumerate(images):
        image = decode_image_bytes(data, f"{source}: image {i}", channels, size)
        if out is None:
            out = np.empty((len(images), *image.shape), dtype=np.uint8)
        elif image.shape != out.shape[1:]:
            raise DataError(f"{source}: image {i} is {image.shape[1]}x{image.shape[0]}, image 0 is "
                            f"{out.shape[2]}x{out.shape[1]}; pass size= to resize them all")  # fmt: skip
        out[i] = image
    if out is None:
        side = size or 0
        return np.empty((0, side, side, 3) if channels == 3 else (0, side, side), dtype=np.uint8)
    return out


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros: no direction")
    return x / norms


def _best_threshold(sim: np.ndarray, same: np.ndarray) -> float:
    """The cosine threshold (same if sim >= t) with the highest accuracy on these pairs; the lowest on ties.

    Candidates are midpoints between consecutive distinct scores plus one below and one above all of them, which
    covers every distinct split exactly (insightface scans a 0.01 grid of squared distances instead).
    """
    u = np.unique(sim)
    candidates = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    pos, neg = np.sort(sim[same]), np.sort(sim[~same])
    correct = (pos.size - np.searchsorted(pos, candidates, side="left")) + np.searchsorted(neg, candidates, "left")
    return float(candidates[int(np.argmax(correct))])


def verification_metrics(
    emb_a: np.ndarray,
    emb_b: np.ndarray,
    issame: np.ndarray,
    fars: Sequence[float] = (1e-3, 1e-2),
    folds: int = 10,
) -> dict[str, float]:
    """Pair i = (emb_a[i], emb_b[i]) scored by cosine; 10-fold accuracy and TAR at each FAR.

    For a cross-model check pass the new model's embeddings of the first images as `emb_a` and the old model's
    of the second as `emb_b`. Keys: "accuracy", "accuracy_std" (across folds, KFold without shuffling as
    insightface), one TAR per FAR named by components.evaluate.tar_name (e.g. "tar@far=1e-3": the highest TAR
    whose FAR <= target), "pairs", "impostor_pairs" and "min_resolvable_far" (1 / impostor pairs). A TAR is NaN
    when the FAR is below min_resolvable_far (fewer than one impostor pair per FAR step) or a class is empty.
    """
    a = _unit_rows(emb_a, "emb_a")
    b = _unit_rows(emb_b, "emb_b")
    same = np.asarray(issame)
    if same.dtype != bool:
        raise ValueError(f"issame must be bool, got {same.dtype}")
    if a.shape != b.shape or same.shape != (a.shape[0],):
        raise ValueError(f"emb_a {a.shape}, emb_b {b.shape} and issame {same.shape} do not describe the same pairs")
    n = a.shape[0]
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be between 2 and the number of pairs ({n}), got {folds}")
    sim = np.sum(a * b, axis=1)  # [n] cosine similarity
    accuracies = []
    for train, test in KFold(n_splits=folds, shuffle=False).split(sim):
        threshold = _best_threshold(sim[train], same[train])
        accuracies.append(float(np.mean((sim[test] >= threshold) == same[test])))
    n_impostor = int((~same).sum())
    out: dict[str, float] = {
        "accuracy": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "pairs": float(n),
        "impostor_pairs": float(n_impostor),
        "min_resolvable_far": 1.0 / n_impostor if n_impostor else math.nan,
    }
    both_classes = 0 < n_impostor < n
    fpr, tpr = np.zeros(1), np.full(1, math.nan)
    if both_classes:
        fpr, tpr, _ = roc_curve(same, sim, drop_intermediate=False)  # every point kept: the maxima below are exact
    for far in fars:
        resolvable = both_classes and n_impostor * far >= 1
        out[tar_name(far)] = float(tpr[fpr <= far].max()) if resolvable else math.nan
    return out
