"""The face team's own evaluation sets, beside the split's retrieval tables: insightface `.bin` verification sets
(LFW, CFP-FP, AgeDB-30 style) and an IJB-C-style template protocol.

Every set is scored for the same model pairs as the test table: old/old, new/old (the new model's side against
the old model's, the backward-compatible case), new/new, and the paragon's. On a `.bin`, pair i is (image 2i,
image 2i + 1): the first image is embedded by the query model, the second by the gallery model
(components.data.verification.verification_metrics: 10-fold accuracy, TAR@FAR). On the IJB-C protocol, templates
are media-weighted means (components.ijb): 1:1 TAR@FAR on the template pairs, the query model's first template
against the gallery model's second; 1:N TPIR@FPIR and CMC with the query model's probe templates searched in the
gallery model's gallery templates.

Images are decoded when a batch is read (never a whole set in memory) and each model sees them through its own
preprocess, as in training.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.data.store import Rows, SourceRows
from components.embed import Embedder, extract
from components.errors import DataError


class EncodedRows(Rows):
    """Encoded images held as bytes (a `.bin`'s payloads: small JPEGs), decoded per read at their own size."""

    def __init__(self, payloads: Sequence[bytes], source: str, size: int, channels: int, max_pixels: int) -> None:
        self._payloads, self.source = list(payloads), source
        self.size, self.channels, self.max_pixels = size, channels, max_pixels
        self._pixel_shape = (size, size) + ((3,) if channels == 3 else ())
        self.rows = np.arange(len(self._payloads), dtype=np.int64)

    def read(self, rows: np.ndarray) -> np.ndarray:
        from components.data.imagefolder import decode_image

        out = np.empty((len(rows), *self._pixel_shape), dtype=np.uint8)
        for i, row in enumerate(np.asarray(rows, dtype=np.int64)):
            out[i] = decode_image(io.BytesIO(self._payloads[row]), f"{self.source}: image {row}", self.size,
                                  self.max_pixels, self.channels)  # fmt: skip
        return out


def model_pairs(models: Mapping[str, Embedder]) -> list[tuple[str, str]]:
    pairs = [("old", "old")]
    return pairs + [p for role in ("new", "paragon") if role in models for p in ((role, "old"), (role, role))]


def verification_set(
    path: str | Path, models: Mapping[str, Embedder], size: int, channels: int, max_pixels: int
) -> dict[str, Any]:
    """{"kind": "verification", "file", "pairs": {"q/g": metrics}} of one insightface `.bin`."""
    from components.data.verification import load_bin, verification_metrics
    from components.evaluate import pair_name

    payloads, issame = load_bin(path)
    images = EncodedRows(payloads, str(path), size, channels, max_pixels)
    feats = {name: extract(model, images) for name, model in models.items()}  # [2 * pairs, d] per model
    out: dict[str, dict[str, float]] = {}
    for q, g in model_pairs(models):
        out[pair_name(q, g)] = verification_metrics(feats[q][0::2], feats[g][1::2], issame)
    return {"kind": "verification", "file": str(path), "pairs": out}


def ijb_set(
    root: str | Path,
    images_dir: str | Path,
    name: str,
    models: Mapping[str, Embedder],
    size: int,
    channels: int,
    max_pixels: int,
) -> dict[str, Any]:
    """{"kind": "ijb", "root", "pairs": {"q/g": metrics}, "templates", "images"} of an IJB-C-style protocol whose
    image names are files under `images_dir`."""
    from components.ijb import evaluate_protocol, read_protocol

    protocol = read_protocol(root, name)
    files = [Path(images_dir) / str(n) for n in protocol.images["name"]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{root}: {len(missing)} of the protocol's {len(files)} images are not under {images_dir}, "
                        f"e.g. {missing[0]}")  # fmt: skip
    rows = SourceRows("imagefolder", np.array([str(f) for f in files]), np.zeros(len(files), dtype=np.int64), size,
                      channels, max_pixels)  # fmt: skip
    feats = {m: extract(model, rows) for m, model in models.items()}
    table = evaluate_protocol(protocol, feats, model_pairs(models))
    pairs = {pair: {k: float(v) for k, v in row.items() if k not in ("query", "gallery")}
             for pair, row in table.iterrows()}  # fmt: skip
    return {"kind": "ijb", "root": str(root), "pairs": pairs, "images": len(files),
            "templates": int(protocol.images["template"].nunique())}  # fmt: skip


def markdown(face: Mapping[str, Mapping[str, Any]]) -> str:
    """One table per face set: rows = model pairs, columns = its metrics."""
    parts: list[str] = []
    for name, record in face.items():
        frame = pd.DataFrame(record["pairs"]).T
        what = "insightface verification pairs" if record["kind"] == "verification" else "IJB-C-style templates"
        parts += [f"## {name}: {what}", "", frame.to_markdown(floatfmt=".4f"), ""]
    return "\n".join(parts)
