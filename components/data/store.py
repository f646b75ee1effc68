"""Stored pixels read on demand: no step holds a whole dataset in memory.

A dataset's pixels are either decoded from their raw source whenever a row is read (`SourceRows`: RecordIO,
WebDataset, or an ImageFolder with data.store: source), or one `images.npy` (uint8 [N, H, W] or [N, H, W, 3], manifest order) written by the prepare
stage, row block by row block (`ArrayWriter`). `ImageRows` is a lazy view of some of its rows (one split): it
indexes like an array (an int, a slice, an array of positions) and reads exactly those rows with `os.pread`, so
neither the file nor a split is ever loaded whole, and no memory map grows the process's resident set as an epoch
touches every page. The view pickles as its path and row numbers, so DataLoader worker processes open the file
themselves.

`batches` feeds a training loop or an extraction through a torch DataLoader: the batch order is the caller's
(seeded, so a resumed run continues exactly), workers (runtime.loader_workers) read and preprocess ahead of the
step, and the pixels are those of `rows[idx]` exactly as an in-memory array would give them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from components.errors import DataError
from components.io import read_at, write_at

if TYPE_CHECKING:
    import torch

    from components.preprocess import Preprocess


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered .npy file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a .npy array ({err})") from None
    if fortran:
        raise DataError(f"{path}: Fortran-ordered array; stored images must be C-ordered")
    return tuple(shape), np.dtype(dtype), offset


class Rows:
    """A lazy array over some rows of a file or source (uint8 images unless a subclass says otherwise): an int, a
    slice or an array of positions reads those rows."""

    rows: np.ndarray  # int64 positions in the whole dataset (manifest order)
    _pixel_shape: tuple[int, ...]

    def read(self, rows: np.ndarray) -> np.ndarray:  # [len(rows), ...] of file rows `rows` (images: uint8 [.., H, W(, 3)])
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self._pixel_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def subset(self, positions: np.ndarray) -> Rows:
        """A view of some of these rows (positions into this view)."""
        view = type(self).__new__(type(self))
        view.__dict__.update(self.__getstate__())
        view.rows = self.rows[np.asarray(positions, dtype=np.int64)]
        return view

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __getitem__(self, key: int | slice | np.ndarray | Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.read(self.rows[[int(key)]])[0]
        if isinstance(key, slice):
            return self.read(self.rows[key])
        return self.read(self.rows[np.asarray(key, dtype=np.int64)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read(self.rows)
        return out if dtype is None else out.astype(dtype)


class ArrayRows(Rows):
    """Rows of a C-ordered .npy file of any dtype, read with os.pread: an int, a slice or an array of positions reads
    exactly those rows (runs of consecutive rows in one call). No memory map: reading every row, as an epoch or a
    pass over old features does, leaves the resident set where it was. Pickles as its path and row numbers."""

    def __init__(self, path: str | Path, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        shape, self._dtype, self._offset = _header(self.path)
        if not shape:
            raise DataError(f"{self.path}: a 0-d array has no rows")
        self._n, self._pixel_shape = shape[0], tuple(shape[1:])
        self._row_bytes = int(np.prod(self._pixel_shape)) * self._dtype.itemsize
        size = self.path.stat().st_size
        if self._offset + self._n * self._row_bytes > size:
            raise DataError(f"{self.path}: truncated: {size} bytes hold fewer than the {self._n} rows its header says")
        self.rows = np.arange(self._n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self._n):
            raise DataError(f"{self.path}: row {int(self.rows.max())} is out of range ({self._n} rows)")
        self._fd: int | None = None
        self._pid: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    # a worker process opens its own descriptor
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """File rows `rows` (in that order): [len(rows), ...]; runs of consecutive rows are read with one call."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self._pixel_shape), dtype=self._dtype)
        if not len(rows):
            return out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        fd = self._descriptor()
        for run in np.split(np.arange(len(rows)), breaks):
            first, count = int(sorted_rows[run[0]]), len(run)
            data = read_at(fd, self._offset + first * self._row_bytes, count * self._row_bytes)
            if len(data) != count * self._row_bytes:
                raise DataError(f"{self.path}: short read at row {first} (file changed while reading?)")
            flat[order[run]] = np.frombuffer(data, dtype=np.uint8).reshape(count, -1)
        return out


class ImageRows(ArrayRows):
    """Rows of a stored images.npy (uint8 [N, H, W] or [N, H, W, 3]), read with os.pread (module docstring)."""

    def __init__(self, path: str | Path, rows: np.ndarray | None = None) -> None:
        super().__init__(path, rows)
        if self._dtype != np.uint8 or len(self._pixel_shape) not in (2, 3):
            raise DataError(
                f"{self.path}: expected uint8 images [N, H, W] or [N, H, W, 3], "
                f"got {self._dtype} {(self._n, *self._pixel_shape)}"
            )


class SourceRows(Rows):
    """Rows decoded from their raw source when read (RecordIO records, WebDataset members, ImageFolder files:
    components.data.sources), at the stored size and channels. Nothing is cached: an epoch decodes what it reads,
    in DataLoader workers when runtime.loader_workers > 0."""

    def __init__(
        self, kind: str, sources: np.ndarray, samples: np.ndarray, size: int, channels: int, max_pixels: int
    ) -> None:
        self.kind, self.size, self.channels, self.max_pixels = kind, size, channels, max_pixels
        names, codes = np.unique(np.asarray(sources, dtype=str), return_inverse=True)
        self._names, self._codes = names, codes.astype(np.int32)  # a source path per row would cost ~100 B each
        self._samples = np.asarray(samples, dtype=np.int64)
        self._pixel_shape = (size, size) + ((3,) if channels == 3 else ())
        self.rows = np.arange(len(self._samples), dtype=np.int64)

    def read(self, rows: np.ndarray) -> np.ndarray:
        from components.data.sources import decode_rows

        rows = np.asarray(rows, dtype=np.int64)
        return decode_rows(self.kind, self._names[self._codes[rows]], self._samples[rows], self.size, self.channels,
                           self.max_pixels)  # fmt: skip


class ArrayWriter:
    """Writes a C-ordered .npy of a known shape and dtype (uint8 images unless told) block by block, rows in any
    order, never holding it whole. The bytes are those `np.save` writes for the same array."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: Any = np.uint8) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(int(n) for n in shape), np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self._offset = f.tell()
            f.truncate(self._offset + int(np.prod(self.shape)) * self.dtype.itemsize)
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_WRONLY)

    def _rows_of(self, values: np.ndarray, n: int) -> np.ndarray:
        values = np.asarray(values)
        if values.shape[1:] != self.shape[1:] or len(values) != n:
            raise ValueError(f"{self.path}: rows of shape {values.shape} do not fit an array of shape {self.shape}")
        return np.ascontiguousarray(values, dtype=self.dtype)

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """values[i] into row rows[i]."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = self._rows_of(values, len(rows)).reshape(len(rows), -1)
        for row, data in zip(rows.tolist(), flat, strict=True):
            write_at(self._fd, self._offset + row * self._row_bytes, data.view(np.uint8).data)

    def write_block(self, start: int, values: np.ndarray) -> None:
        """values into rows start, start + 1, ... with one write."""
        if start < 0 or start + len(values) > self.shape[0]:
            raise ValueError(f"{self.path}: rows {start}..{start + len(values)} are outside {self.shape[0]} rows")
        block = self._rows_of(values, len(values))
        write_at(self._fd, self._offset + start * self._row_bytes, block.reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- loading


class _Batches:
    """A map-style dataset whose items are whole batches: positions -> preprocessed float tensor."""

    def __init__(self, images: Rows, preprocess: Preprocess) -> None:
        self.images, self.preprocess = images, preprocess

    def __getitem__(self, positions: np.ndarray) -> torch.Tensor:
        return self.preprocess.tensor(self.images[positions])


_LOADER = {"declared": None, "decode": 2}  # runtime.loader_workers, runtime.workers (set_loader_workers)


def set_loader_workers(declared: int | None, decode: int) -> None:
    """runtime.loader_workers (None: decide per store) and runtime.workers, set by components.pipeline.run."""
    _LOADER["declared"], _LOADER["decode"] = declared, decode


def loader_workers(images: Rows | np.ndarray) -> int:
    """DataLoader processes for reading `images`: runtime.loader_workers if set, else 0 for stored images (a
    batch is one read) and runtime.workers for rows decoded from raw files."""
    if _LOADER["declared"] is not None:
        return int(_LOADER["declared"])
    return int(_LOADER["decode"]) if isinstance(images, SourceRows) else 0


def batches(
    images: Rows | np.ndarray, preprocess: Preprocess, order: Iterable[np.ndarray], workers: int | None = None
) -> Iterator[torch.Tensor]:
    """Model input for each array of positions in `order`, in that order, read and preprocessed ahead by
    `workers` processes (None: `loader_workers(images)`; 0: in this process, the fastest for small stored
    images)."""
    workers = loader_workers(images) if workers is None else workers
    if not isinstance(images, Rows):  # an array already in memory (tests, benchmarks)
        for positions in order:
            yield preprocess.tensor(np.asarray(images[np.asarray(positions)]))
        return
    import torch
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": 4} if workers > 0 else {}
    # Its own generator: a DataLoader draws a base seed for its workers from the global torch RNG otherwise, and
    # every draw the training makes after that (a method's sampling) would shift.
    loader = DataLoader(_Batches(images, preprocess), sampler=list(order), batch_size=None, num_workers=workers,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0), **extra)  # fmt: skip
    yield from loader


def chunks(n: int, size: int) -> list[np.ndarray]:
    """Positions 0..n-1 in consecutive chunks of `size` (extraction order)."""
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]
