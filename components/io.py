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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# What atomic_path / atomic_dir leave behind when the writer is killed before its `finally` runs (SIGKILL,
# power loss): `.NAME.RANDOM.tmp[SUFFIX]` files or folders, and `.NAME.old` mid-swap.
_STALE = re.compile(r"^\..+\.(tmp(\.[A-Za-z0-9]+)?|old)$")


def sweep_stale(root: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files and folders that interrupted atomic writes left under `root`; log and return them.

    Call it only while holding `exclusive(root)`: a live writer's temp files look the same.
    """
    root = Path(root)
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
