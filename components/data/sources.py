"""The raw sources a dataset's rows come from, one reader per format, and decoding a row on demand.

A manifest row names its `source` and `sample`:

| data.source  | source                     | sample                                  | identity                 |
|--------------|----------------------------|-----------------------------------------|--------------------------|
| kanjivg      | an SVG file                | the rendering's index (seeded jitter)   | the character            |
| imagefolder  | an image file              | 0                                       | its folder's name        |
| recordio     | the .rec file              | the record's key in its .idx            | the header's class label |
| webdataset   | a .tar shard               | the byte offset of the image member     | the `cls` / `json` label |

Rows are listed from an index, never by decoding: a RecordIO's .idx and record headers (labels), a shard's tar
headers and label members. Pixels are decoded when a row is read (`decode_rows`), at the stored size and channels
(data.image_size, data.channels), by the same decoder as every other image (components.data.imagefolder).
Readers are cached per process, so DataLoader workers each open their own files once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.errors import DataError

RECORD_SOURCES = frozenset({"recordio", "webdataset"})  # many samples per file: decoded per row, never per file

# (pid, kind, source, size, mtime) -> reader of that source: per process (workers open their own files), and per
# version of the file, so a long-lived process (a Prefect worker) never reads a replaced file through a stale index.
_READERS: dict[tuple[Any, ...], Any] = {}


def recordio_path(root: str | Path) -> Path:
    """data.root of a RecordIO set: the .rec file, or a folder holding train.rec (insightface's layout)."""
    root = Path(root)
    rec = root / "train.rec" if root.is_dir() else root
    if not rec.is_file():
        raise DataError(f"{root}: no RecordIO file (data.root: a .rec file with its .idx beside it, or a folder "
                        "holding train.rec + train.idx)")  # fmt: skip
    return rec


def _reader(kind: str, source: str) -> Any:
    try:
        stat = os.stat(source)
    except OSError as err:
        raise DataError(f"{source}: cannot read ({err.strerror or err})") from None
    key = (os.getpid(), kind, source, stat.st_size, stat.st_mtime_ns)
    if key not in _READERS:
        for old in [k for k in _READERS if k[:3] == key[:3]]:
            del _READERS[old]
        if kind == "recordio":
            from components.data.recordio import RecordIOReader

            _READERS[key] = RecordIOReader(source)
        else:
            from components.data.webdataset import index_shards

            _READERS[key] = {e.offset: e for e in index_shards([source])}
    return _READERS[key]


def record_items(kind: str, root: str) -> list[tuple[str, int, str]]:
    """(source, sample, identity) of every image of a RecordIO set or a WebDataset, from its index only."""
    if kind == "recordio":
        from components.data.recordio import RecordIOReader

        rec = recordio_path(root)
        reader = RecordIOReader(rec)
        keys = reader.image_keys()
        labels = reader.labels(keys)  # headers only: no image is decoded to list the set
        return [(str(rec), int(k), str(int(label))) for k, label in zip(keys, labels, strict=True)]
    from components.data.webdataset import expand_shards, index_shards

    shards = expand_shards(root)
    if not shards:
        raise DataError(f"{root}: no WebDataset shards (data.root: a folder of .tar shards, a glob, or "
                        "shard-{000000..000009}.tar)")  # fmt: skip
    return [(e.shard, e.offset, e.identity) for e in index_shards(shards)]


def decode_row(kind: str, source: str, sample: int, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """One row's pixels, uint8 [size, size] or [size, size, 3]."""
    from components.data.imagefolder import decode_image

    if kind == "imagefolder":
        return decode_image(Path(source), source, size, max_pixels, channels)
    if kind == "recordio":
        import io

        _, payload = _reader(kind, source).read(int(sample))
        if not payload:
            raise DataError(f"{source}: key {sample}: the record holds no image bytes (a header record?)")
        return decode_image(io.BytesIO(payload), f"{source} (key {sample})", size, max_pixels, channels)
    if kind == "webdataset":
        import io

        from components.data.webdataset import read_image_bytes

        entry = _reader(kind, source).get(int(sample))
        if entry is None:
            raise DataError(f"{source}: no image member at offset {sample}; the shard changed since it was indexed")
        return decode_image(io.BytesIO(read_image_bytes(entry)), f"{source} ({entry.key})", size, max_pixels, channels)
    raise DataError(f"data.source {kind!r} is not decoded per row (its pixels are stored by the prepare stage)")


def decode_rows(
    kind: str, sources: Sequence[str], samples: Sequence[int], size: int, channels: int, max_pixels: int
) -> np.ndarray:
    out = np.empty((len(sources), size, size) + ((3,) if channels == 3 else ()), dtype=np.uint8)
    for i, (source, sample) in enumerate(zip(sources, samples, strict=True)):
        out[i] = decode_row(kind, str(source), int(sample), size, channels, max_pixels)
    return out
