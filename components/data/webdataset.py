"""WebDataset tar shards with random access: an index of (shard, key, byte range) built from tar headers.

Format (webdataset/webdataset `webdataset/tariterators.py`, and its README's format notes): samples are files
inside uncompressed POSIX tar shards, grouped by key: a member `dir/key.seg.png` has key `dir/key` and extension
`seg.png` (everything after the first dot of the base name, lower-cased); members named `__...__` are metadata
and skipped, as are non-regular members. Shard lists use brace notation, `shard-{000000..000009}.tar`, expanded
as the `braceexpand` package does (webdataset's own dependency), zero padding included.

Here a sample is one image member (`jpg`, `jpeg`, `png` or `webp`) plus a label member: `cls` (a text integer,
as webdataset's decoder reads it) or `json` holding an "identity" (string or integer). When both are present
`cls` wins: a json "identity" may be a name while `cls` is the class index.

The maintained `webdataset` package streams shards sequentially and has no random access, while training here
reads rows in a seeded order; so stdlib `tarfile` reads the headers once (never the image data) and each image is
read by `os.pread` at its recorded offset. That needs uncompressed shards (`.tar`, not `.tar.gz`).
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.data.recordio import decode_image_bytes
from components.errors import DataError
from components.io import atomic_path, read_at

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp"})
LABEL_EXTS = ("cls", "json")  # in order of precedence
_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class ShardEntry:
    """One sample: its shard, key, identity and the byte range of its image member's data in the shard."""

    shard: str
    key: str
    offset: int
    size: int
    identity: str


def _pread(path: str, offset: int, size: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot open shard: {e.strerror}") from e
    try:
        return read_at(fd, offset, size)
    finally:
        os.close(fd)


def _identity(shard: str, key: str, ext: str, data: bytes) -> str:
    """The label member's identity: `cls` text integer, or `json` {"identity": str | int}."""
    where = f"{shard}: {key}.{ext}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: label member is not UTF-8 text: {e}") from e
    if ext == "cls":
        if not re.fullmatch(r"\s*-?\d+\s*", text):
            raise DataError(f"{where}: expected an integer class, got {text[:40]!r}")
        return str(int(text))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON: {e}") from e
    identity = obj.get("identity") if isinstance(obj, dict) else None
    if isinstance(identity, bool) or not isinstance(identity, (str, int)) or identity == "":
        raise DataError(f"{where}: expected a JSON object with an \"identity\" string or integer, "
                        f"got {text[:60]!r}")  # fmt: skip
    return str(identity)


def _index_shard(shard: str) -> list[ShardEntry]:
    try:
        size = os.path.getsize(shard)
        with tarfile.open(shard, mode="r:") as tar:  # "r:": uncompressed only, as offsets must be file offsets
            members = [m for m in tar if m.isreg()]
            stop = tar.offset  # where tarfile stopped reading headers
    except FileNotFoundError:
        raise DataError(f"{shard}: shard does not exist") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{shard}: not a readable uncompressed tar shard ({e}); random access needs plain .tar "
                        "shards, so decompress .tar.gz ones first")  # fmt: skip
    # tarfile ends its iteration silently at a truncated or unreadable header after the first member, which would
    # drop every later sample; a complete archive stops at its end-of-archive block, 512 zero bytes (POSIX ustar).
    if _pread(shard, stop, tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise DataError(f"{shard}: at offset {stop}: neither a tar header nor the end-of-archive block; the shard is "
                        "truncated or corrupt, and the members after it would be lost")  # fmt: skip
    samples: dict[str, dict[str, tuple[int, int]]] = {}  # key -> ext -> (offset, size), in tar order
    for m in members:
        if _META.match(m.name):
            continue
        found = _BASE_EXT.match(m.name)
        if found is None:
            continue  # no extension: webdataset skips it too
        key, ext = found.group(1), found.group(2).lower()
        if m.offset_data + m.size > size:
            raise DataError(f"{shard}: {m.name}: data runs past the end of the file ({size} bytes); the shard is "
                            "truncated")  # fmt: skip
        members_of_key = samples.setdefault(key, {})
        if ext in members_of_key:
            raise DataError(f"{shard}: {m.name}: key {key!r} has two {ext!r} members")
        members_of_key[ext] = (m.offset_data, m.size)
    entries = []
    for key, exts in samples.items():
        images = sorted(IMAGE_EXTS & exts.keys())
        if not images:
            raise DataError(f"{shard}: key {key!r} has no image member (one of "
                            f"{', '.join(sorted(IMAGE_EXTS))}); it has {', '.join(sorted(exts))}")  # fmt: skip
        if len(images) > 1:
            raise DataError(f"{shard}: key {key!r} has {len(images)} image members ({', '.join(images)}); "
                            "expected one")  # fmt: skip
        label_ext = next((e for e in LABEL_EXTS if e in exts), None)
        if label_ext is None:
            raise DataError(f"{shard}: key {key!r} has no label member (cls or json with an \"identity\"); it has "
                            f"{', '.join(sorted(exts))}")  # fmt: skip
        label_offset, label_size = exts[label_ext]
        identity = _identity(shard, key, label_ext, _pread(shard, label_offset, label_size))
        offset, nbytes = exts[images[0]]
        entries.append(ShardEntry(shard, key, offset, nbytes, identity))
    return entries


def index_shards(paths: Sequence[str | Path]) -> list[ShardEntry]:
    """Every sample of the shards, in shard then tar order, from tar headers and label members only.

    A key without an image or a label, and a key found in two shards, raise DataError naming shard and key.
    """
    entries: list[ShardEntry] = []
    seen: dict[str, str] = {}  # key -> shard
    for path in paths:
        shard = str(path)
        for entry in _index_shard(shard):
            if entry.key in seen:
                raise DataError(f"{shard}: key {entry.key!r} is also in {seen[entry.key]}; keys must be unique "
                                "across shards")  # fmt: skip
            seen[entry.key] = shard
            entries.append(entry)
    return entries


def read_image_bytes(entry: ShardEntry) -> bytes:
    """The image member's bytes, read at its recorded offset."""
    data = _pread(entry.shard, entry.offset, entry.size)
    if len(data) != entry.size:
        raise DataError(f"{entry.shard}: {entry.key}: expected {entry.size} image bytes at offset {entry.offset}, "
                        f"the shard holds {len(data)}; it changed or is truncated since it was indexed")  # fmt: skip
    return data


def decode_entry(entry: ShardEntry, channels: int = 3) -> np.ndarray:
    """The sample's image as uint8 [H, W, 3] RGB (or [H, W] for channels=1)."""
    return decode_image_bytes(read_image_bytes(entry), f"{entry.shard} ({entry.key})", channels)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same samples give the same bytes, so content hashes (DVC) are stable
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, samples: Iterable[tuple[str, str, bytes, str]], per_shard: int = 100) -> list[Path]:
    """Write (key, identity, image bytes, ext) samples as `folder/shard-000000.tar`, ... each written atomically.

    The label is `key.cls` when the identity is an integer written canonically ("12"), else `key.json`
    {"identity": ...}, so identities read back unchanged. No samples, no shards.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    folder = Path(folder)
    shards: list[Path] = []
    batch: list[tuple[str, str, bytes, str]] = []
    seen: set[str] = set()

    def flush() -> None:
        path = folder / f"shard-{len(shards):06d}.tar"
        with atomic_path(path, suffix=".tar") as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, identity, image, ext in batch:
                _add(tar, f"{key}.{ext}", image)
                if re.fullmatch(r"-?\d+", identity) and str(int(identity)) == identity:
                    _add(tar, f"{key}.cls", identity.encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"identity": identity}).encode())
        shards.append(path)
        batch.clear()

    for key, identity, image, ext in samples:
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"sample {key!r}: image extension {ext!r} is not one of {', '.join(sorted(IMAGE_EXTS))}")
        if not key or "." in key.rsplit("/", 1)[-1] or key.startswith("__"):
            raise ValueError(f"sample key {key!r}: must be non-empty, without a dot in its last part (webdataset "
                             "splits the extension at the first dot) and not start with '__'")  # fmt: skip
        if key in seen:
            raise ValueError(f"sample key {key!r} is given twice")
        seen.add(key)
        batch.append((key, str(identity), bytes(image), ext))
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    return shards


def _brace_options(body: str) -> list[str]:
    found = _RANGE.match(body)
    if found:  # {a..b}: inclusive, either direction, zero-padded to the longer end when an end is padded
        left, right = found.groups()
        start, stop = int(left), int(right)
        padded = any(s.lstrip("-").startswith("0") and s.lstrip("-") != "0" for s in (left, right))
        width = max(len(left), len(right)) if padded else 0
        step = 1 if stop >= start else -1
        return [f"{i:0{width}d}" for i in range(start, stop + step, step)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]  # braceexpand leaves "{x}" as it is


def _brace_expand(pattern: str) -> list[str]:
    found = _BRACE.search(pattern)
    if found is None:
        if "{" in pattern or "}" in pattern:
            raise DataError(f"{pattern}: unbalanced braces in the shard pattern")
        return [pattern]
    head, tail = pattern[: found.start()], pattern[found.end() :]
    if "{" in head or "}" in head:
        raise DataError(f"{pattern}: nested or unbalanced braces in the shard pattern are not supported")
    return [head + option + rest for option in _brace_options(found.group(1)) for rest in _brace_expand(tail)]


def expand_shards(pattern: str) -> list[Path]:
    """Shard paths from a folder (its *.tar, sorted), a glob, or brace notation ("shard-{000000..000009}.tar").

    Brace expansion keeps its order; a glob is sorted. A name that matches nothing raises DataError.
    """
    if Path(pattern).is_dir():
        shards = sorted(Path(pattern).glob("*.tar"))
        if not shards:
            raise DataError(f"{pattern}: no *.tar shards in this folder")
        return shards
    out: list[Path] = []
    for name in _brace_expand(pattern):
        if any(c in name for c in "*?["):
            matches = sorted(glob.glob(name))
            if not matches:
                raise DataError(f"{name}: no shard matches this pattern")
            out += [Path(m) for m in matches]
        elif Path(name).is_file():
            out.append(Path(name))
        else:
            raise DataError(f"{name}: shard does not exist" + (f" (from {pattern})" if name != pattern else ""))
    return list(dict.fromkeys(out))  # a shard named twice is read once
