"""A small face-shaped world the tests write themselves: KanjiVG glyphs rendered at face size and colourised per
identity (a tint, a background, a per-sample brightness), stored the ways face teams store data: an insightface
RecordIO (train.rec + train.idx + property), an ImageFolder, WebDataset shards, a `.bin` verification set of
consecutive pairs and an IJB-C-style protocol (templates of several media, 1:1 pairs, 1:N gallery and probes).

No real face is involved: what is checked is that every format flows through the pipeline and is scored; the
identities are glyphs, so the numbers say nothing about faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.data.kanjivg import render_samples
from components.data.recordio import encode_image, write_recordio
from components.data.verification import write_bin
from components.data.webdataset import write_shards
from components.ijb import write_protocol


def glyph_files(root: Path, n: int) -> list[Path]:
    """`n` base-form KanjiVG files of a copy of the package data (the `kanjivg_raw` fixture), in name order."""
    files = sorted(p for p in Path(root).glob("*.svg") if "-" not in p.stem)
    if len(files) < n:
        raise FileNotFoundError(f"{root}: fewer than {n} KanjiVG files")
    return files[200 : 200 + n]  # skip the first code points: punctuation-like glyphs


def faces(svg: Path, identity: int, samples: int, size: int, first: int = 0) -> np.ndarray:
    """uint8 [samples, size, size, 3]: one identity's 'face' images (rendering indices first..)."""
    gray = render_samples(svg, 7, list(range(first, first + samples)), size).astype(np.float32) / 255.0
    rng = np.random.default_rng(identity)
    tint, background = rng.uniform(0.2, 1.0, 3), rng.uniform(0.0, 0.6, 3)
    out = np.empty((samples, size, size, 3), dtype=np.uint8)
    for i, g in enumerate(gray):  # glyph strokes are dark on white: ink takes the identity's tint
        ink = 1.0 - g[..., None]
        light = np.random.default_rng([identity, first + i]).uniform(0.8, 1.1)
        pixels = (background + ink * (tint - background)) * light
        out[i] = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
    return out


def write_recordio_set(folder: Path, images: dict[int, np.ndarray]) -> Path:
    """insightface layout: folder/train.rec, train.idx, property; labels are the identity numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    size = next(iter(images.values())).shape[1]
    items = ((float(label), encode_image(im, "JPEG", 95)) for label, ims in images.items() for im in ims)
    write_recordio(folder / "train.rec", items, header_record=True, property=(len(images), size, size))
    return folder / "train.rec"


def write_imagefolder(root: Path, images: dict[int, np.ndarray]) -> Path:
    from PIL import Image

    for label, ims in images.items():
        (root / f"id{label:04d}").mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(ims):
            Image.fromarray(im).save(root / f"id{label:04d}" / f"{i:03d}.png")
    return root


def write_webdataset(folder: Path, images: dict[int, np.ndarray], per_shard: int = 50) -> list[Path]:
    samples = ((f"id{label:04d}_{i:03d}", str(label), encode_image(im, "PNG"), "png")
               for label, ims in images.items() for i, im in enumerate(ims))  # fmt: skip
    return write_shards(folder, samples, per_shard=per_shard)


def write_verification_bin(path: Path, images: dict[int, np.ndarray], pairs: int, seed: int = 0) -> Path:
    """`pairs` consecutive (a, b) pairs, half genuine (two images of one identity), half impostor."""
    rng = np.random.default_rng(seed)
    labels = sorted(images)
    payloads: list[bytes] = []
    same: list[bool] = []
    for p in range(pairs):
        genuine = p % 2 == 0
        a = int(rng.choice(labels))
        b = a if genuine else int(rng.choice([x for x in labels if x != a]))
        if genuine:
            i, j = rng.choice(len(images[a]), size=2, replace=False)
        else:
            i, j = rng.integers(len(images[a])), rng.integers(len(images[b]))
        payloads += [encode_image(images[a][i], "JPEG"), encode_image(images[b][j], "JPEG")]
        same.append(genuine)
    return write_bin(path, payloads, same)


def write_ijb(root: Path, images: dict[int, np.ndarray], media_per_template: int = 2) -> tuple[Path, Path]:
    """root/meta/ijbc_*.txt|csv + root/loose_crop/*.jpg. Two templates per subject (gallery G1 / probe), each of
    `media_per_template` media with the subject's images spread over them; 1:1 pairs: every probe template
    against every gallery template; a third of the subjects stay out of the gallery (non-mated probes)."""
    crops = root / "loose_crop"
    crops.mkdir(parents=True, exist_ok=True)
    rows, gallery, probes = [], [], []
    template = media = 0
    subjects = sorted(images)
    enrolled = [s for k, s in enumerate(subjects) if k % 3 != 2]
    for subject in subjects:
        ims = images[subject]
        halves = (ims[: len(ims) // 2], ims[len(ims) // 2 :])
        for side, part in zip(("gallery", "probe"), halves, strict=True):
            template += 1
            for k, im in enumerate(part):
                if k % max(1, len(part) // media_per_template) == 0:
                    media += 1
                name = f"{subject}_{template}_{k}.jpg"
                (crops / name).write_bytes(encode_image(im, "JPEG"))
                rows.append((name, template, media))
            if side == "gallery" and subject in enrolled:
                gallery.append((template, subject, f"{subject}.jpg"))
            elif side == "probe":
                probes.append((template, subject, f"{subject}.jpg"))
    frame = pd.DataFrame(rows, columns=["name", "template", "media"])
    g = pd.DataFrame(gallery, columns=["template", "subject", "FILENAME"])
    pr = pd.DataFrame(probes, columns=["template", "subject", "FILENAME"])
    pairs = pd.DataFrame([(p, q, int(ps == gs)) for p, ps, _ in probes for q, gs, _ in gallery],
                         columns=["t1", "t2", "label"])  # fmt: skip
    write_protocol(root, frame, pairs, g, pr)
    return root, crops
