"""Atomic output helpers: write to a temp file in the same folder, then rename.

A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TMP}{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP, dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}{OLD}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What atomic_path / atomic_dir leave behind when the writer is killed before its `finally` runs (SIGKILL,
# power loss): `.NAME.XXXXXXXX.mixbct-tmp[SUFFIX]` files or folders (8 random characters from tempfile), and
# `.NAME.mixbct-old` mid-swap. The `mixbct-` part keeps a user's own `.notes.tmp` or `.thesis.tex.old` out of it.
TMP, OLD = ".mixbct-tmp", ".mixbct-old"
_STALE = re.compile(r"^\..+\.[a-z0-9_]{8}\.mixbct-tmp(\.[A-Za-z0-9]+)?$|^\..+\.mixbct-old$")
# A work folder this project made (or adopted, when it held nothing else): the only kind the sweep touches.
MARKER = ".mixbct-workdir"


def foreign_entries(root: str | os.PathLike[str], layout: frozenset[str], fail: bool = False) -> list[str]:
    """Names in `root` that are not the project's (none when it carries the marker or does not exist yet).

    With `fail`, any such name raises an error naming the folder and a few of them.
    """
    from components.errors import UpgradeError

    root = Path(root)
    if not root.is_dir() or (root / MARKER).is_file():
        return []
    foreign = sorted(p.name for p in root.iterdir() if p.name not in layout | {".lock", MARKER} and not _STALE.match(p.name))
    if foreign and fail:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UpgradeError(
            f"{root}: not a mixbct work folder (it holds {shown} and no {MARKER} file); use an empty or new --workdir"
        )
    return foreign


def claim_workdir(root: str | os.PathLike[str], layout: frozenset[str]) -> Path:
    """Mark `root` as a mixbct work folder, or refuse one that holds anything else.

    A new or empty folder, or one holding only names of the project's `layout` (a work folder of an older
    version), gets the marker file. A folder with other content (the user's own files) is refused, so nothing
    is written into it or swept from it. Call it while holding `exclusive(root)`.
    """
    root = Path(root)
    marker = root / MARKER
    if not marker.is_file():
        foreign_entries(root, layout, fail=True)
        write_text(marker, "This folder holds mixbct stage outputs; interrupted writes in it are swept on the next run.\n")
    return marker


def sweep_stale(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files and folders that interrupted atomic writes left under `root`; log and return them.

    Only in a folder that carries the marker (see `claim_workdir`), and only names the atomic writers create.
    Call it only while holding `exclusive(root)`: a live writer's temp files look the same.
    """
    root = Path(root)
    if not (root / MARKER).is_file():
        log.warning("%s: no %s marker, so no interrupted writes are swept", root, MARKER)
        return []
    stale = sorted((p for p in root.rglob(".*") if _STALE.match(p.name)), key=lambda p: len(p.parts))
    removed: list[Path] = []
    for p in stale:
        if any(parent in removed for parent in p.parents):
            continue  # inside a folder already removed
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.info("removed an interrupted write: %s", p)
        removed.append(p)
    return removed


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None], suffix: str = "") -> Path:
    """Run `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def read_at(fd: int, offset: int, size: int) -> bytes:
    """Up to `size` bytes at `offset` of an open descriptor, without moving a shared file position (os.pread; a
    seek on Windows, where a caller's descriptor is its own). Fewer bytes only at the end of the file."""
    chunks: list[bytes] = []
    while size > 0:
        if hasattr(os, "pread"):
            chunk = os.pread(fd, size, offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, size)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def write_at(fd: int, offset: int, data: bytes | memoryview) -> None:
    """All of `data` at `offset` of an open descriptor (os.pwrite, looping over short writes; a seek on Windows)."""
    view = memoryview(data).cast("B")
    while len(view):
        if hasattr(os, "pwrite"):
            done = os.pwrite(fd, view, offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            done = os.write(fd, view)
        view, offset = view[done:], offset + done


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | os.PathLike[str]) -> str:
    """Content hash of a file or a folder (relative paths + contents, in sorted order)."""
    root = Path(root)
    if root.is_file():
        return file_sha256(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


@contextmanager
def exclusive(folder: str | os.PathLike[str], what: str = "an upgrade") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (a `.lock` file inside it) for the block, or fail at once.

    Two runs writing into the same work folder would mix each other's outputs; the second one is refused with
    a clear message instead of waiting or corrupting anything. The OS drops the lock if the holder dies.
    """
    import fcntl

    from components.errors import UpgradeError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")  # noqa: SIM115 (held for the block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UpgradeError(f"{folder}: {what} is already running here ({holder}); wait for it or use another --workdir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()
