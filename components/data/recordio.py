"""insightface / MXNet RecordIO face sets (`train.rec` + `train.idx` + `property`), read and written without mxnet.

MS1M, Glint360K and most insightface training sets ship this way, and mxnet does not install on Python 3.11, so
the container and the image-record header are implemented here from their sources:

- Container: dmlc-core `include/dmlc/recordio.h` and `src/recordio.cc` (RecordIOWriter::WriteRecord,
  RecordIOReader::NextRecord). A record is uint32 magic 0xced7230a, uint32 `lrecord` (upper 3 bits `cflag`,
  lower 29 bits the length), the payload, zero padding to 4 bytes, all little endian. When the payload holds
  the magic word at a 4-aligned offset, the writer cuts the payload there and drops those 4 bytes: parts are
  cflag 1 (first), 2 (middle), 3 (last), and the reader joins them putting the magic word back between them.
  (Old dmlc-core, before 2016, used magic 0x3ed7230a with a 2-bit cflag; no insightface set uses it.)
- Index: mxnet `python/mxnet/recordio.py` (MXIndexedRecordIO): `key<TAB>offset` per line.
- Image record: the same file (IRHeader, pack, unpack): struct `IfQQ` = flag uint32, label float32, id uint64,
  id2 uint64 (24 bytes); when flag > 0, `flag` float32 labels follow and `label` is unused.
- Face layout: insightface `recognition/arcface_torch/dataset.py` (MXFaceDataset) and `src/data/face2rec2.py`.
  Record 0 may be a header, packed with an empty payload, whose labels are (first identity record, end of
  identity records): images are keys 1 .. label[0] - 1 (`range(1, int(header.label[0]))`), and keys
  label[0] .. label[1] - 1 are per-identity records (labels = that identity's image key range), which no
  reader here needs. Sets without that header (insightface's newer RecBuilder) number images from key 0.
  `property` is `num_classes,H,W` on its first line (RecBuilder adds the image count on a second one).

The image decoding helpers (`decode_image_bytes`, `encode_image`) live here and are shared by the other
in-memory formats (verification .bin, WebDataset shards).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np
from PIL import Image

from components.data.imagefolder import MAX_PIXELS, decode_image
from components.errors import DataError
from components.io import atomic_path, read_at

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEAD = struct.Struct("<II")  # magic, lrecord
_IR = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes, the same with native alignment as mxnet packs it
_LENGTH_MASK = (1 << 29) - 1
_HEADER_PREFIX = _IR.size + 4 * 8  # one read covers the header and up to 8 extra labels (the common case)


def _padded(n: int) -> int:
    return (n + 3) & ~3


# --- images -------------------------------------------------------------------------------------------------


def decode_image_bytes(data: bytes, source: str, channels: int = 3, size: int | None = None) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ... anything PIL opens) as uint8 [H, W, 3] RGB or [H, W] for channels=1,
    decoded exactly as an ImageFolder file is (components.data.imagefolder.decode_image: the pixel budget
    data.max_pixels checked on the header, EXIF rotation, 16-bit scaling, transparency onto white). `source` names
    where the bytes came from (file and key) in every error. With `size`, resized to size x size (bilinear)."""
    return decode_image(io.BytesIO(data), source, size, MAX_PIXELS, channels)


def encode_image(array: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """uint8 [H, W] or [H, W, 3] pixels as encoded bytes (JPEG at `quality`, or PNG, lossless)."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
        raise ValueError(f"expected uint8 [H, W] or [H, W, 3] pixels, got {a.dtype} {a.shape}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    name = {"JPG": "JPEG"}.get(fmt.upper(), fmt.upper())
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=name, **({"quality": quality} if name == "JPEG" else {}))
    return buf.getvalue()


# --- records ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IRHeader:
    """mxnet's image-record header. `label` is a float, or float32 [flag] when flag > 0 (extra labels)."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def _pack_header(label: float | Sequence[float], key: int) -> bytes:
    """IRHeader + extra labels, as mxnet.recordio.pack: a number gives flag 0, a sequence flag = its length."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return _IR.pack(0, float(label), key, 0)
    labels = np.asarray(label, dtype="<f4").ravel()
    if labels.size == 0:
        raise ValueError(f"record {key}: an empty label sequence cannot be packed (flag 0 means a scalar label)")
    return _IR.pack(labels.size, 0.0, key, 0) + labels.tobytes()


def _container(payload: bytes) -> bytes:
    """One payload as dmlc RecordIO bytes, split where the magic word sits at a 4-aligned offset (as dmlc does)."""
    if len(payload) > _LENGTH_MASK:
        raise ValueError(f"a RecordIO record holds at most {_LENGTH_MASK:,} bytes, got {len(payload):,}")
    aligned = np.frombuffer(payload, dtype="<u4", count=len(payload) // 4)
    cuts = (np.flatnonzero(aligned == MAGIC) * 4).tolist()  # byte offsets of the magic word to cut out
    out = bytearray()
    start = 0
    for cut in cuts:
        out += _HEAD.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (cut - start))
        out += payload[start:cut]  # both ends are 4-aligned: no padding inside a split record
        start = cut + 4
    tail = len(payload) - start
    out += _HEAD.pack(MAGIC, ((3 if cuts else 0) << 29) | tail)
    out += payload[start:]
    out += bytes(_padded(tail) - tail)
    return bytes(out)


def _header_record(n_images: int) -> bytes:
    """insightface's key 0 for n images at keys 1..n: labels (first identity record, end of identity records),
    both n + 1 since no per-identity records are written (MXFaceDataset never reads them)."""
    end = float(n_images + 1)
    return _container(_pack_header([end, end], 0))


def write_recordio(
    rec: Path,
    items: Iterable[tuple[float | Sequence[float], bytes]],
    header_record: bool = True,
    property: tuple[int, int, int] | None = None,
) -> Path:
    """Write (label, encoded image) items as `rec` + its `.idx` (and `property`), each file atomically.

    With `header_record`, key 0 is the insightface header (flag 2, labels [n + 1, n + 1]: images are keys 1..n
    and there are no per-identity records) and item i is key i + 1; without it item i is key i. A sequence label
    becomes extra float32 labels (flag = its length), as mxnet.recordio.pack writes it. Items are streamed.
    """
    rec = Path(rec)
    first = 1 if header_record else 0
    with (
        atomic_path(rec.with_suffix(".idx")) as tmp_idx,
        atomic_path(rec) as tmp_rec,
        open(tmp_rec, "wb") as f_rec,
        open(tmp_idx, "w", encoding="ascii") as f_idx,
    ):
        if header_record:
            # Key 0's offset and size are known now (its 32-byte payload never holds the magic word); its labels
            # need the image count, so its bytes are filled in at the end.
            f_idx.write("0\t0\n")
            f_rec.write(bytes(len(_header_record(0))))
        n = 0
        for key, (label, image) in enumerate(items, start=first):
            f_idx.write(f"{key}\t{f_rec.tell()}\n")
            f_rec.write(_container(_pack_header(label, key) + bytes(image)))
            n += 1
        if header_record:
            f_rec.seek(0)
            f_rec.write(_header_record(n))
    if property is not None:
        with atomic_path(rec.parent / "property") as tmp:
            tmp.write_text("{},{},{}\n".format(*(int(v) for v in property)), encoding="ascii")
    return rec


# --- reading ------------------------------------------------------------------------------------------------


def _read_index(idx: Path, rec: Path, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) from `key<TAB>offset` lines, sorted by key; every offset must leave room for a record."""
    try:
        text = idx.read_text(encoding="ascii")
    except FileNotFoundError:
        raise DataError(f"{idx}: RecordIO index does not exist (expected beside {rec.name})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{idx}: cannot read RecordIO index: {e}") from e
    keys: list[int] = []
    offsets: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a trailing blank line is harmless
        fields = line.split()  # mxnet writes a tab; spaces are accepted too
        if len(fields) != 2 or not (fields[0].isdigit() and fields[1].isdigit()):  # ASCII text: 0-9 only
            raise DataError(f"{idx}: line {number}: expected 'key<TAB>offset' (two non-negative integers), "
                            f"got {line[:80]!r}")  # fmt: skip
        key, offset = int(fields[0]), int(fields[1])
        if offset + _HEAD.size > rec_size:
            raise DataError(f"{idx}: line {number}: offset {offset} (key {key}) is beyond the end of {rec} "
                            f"({rec_size} bytes); the .rec is truncated or belongs to another index")  # fmt: skip
        keys.append(key)
        offsets.append(offset)
    if not keys:
        raise DataError(f"{idx}: RecordIO index lists no records")
    k = np.asarray(keys, dtype=np.int64)
    o = np.asarray(offsets, dtype=np.int64)
    order = np.argsort(k, kind="stable")
    k, o = k[order], o[order]
    dup = np.flatnonzero(k[1:] == k[:-1])
    if dup.size:
        raise DataError(f"{idx}: key {k[dup[0]]} is listed more than once")
    k.flags.writeable = False
    return k, o


def _class_id(value: float, where: str) -> int:
    """A float label as a class id: finite, integral (float32 holds ids exactly up to 2^24) and >= 0."""
    v = float(value)
    if not math.isfinite(v) or abs(v - round(v)) >= 1e-3 or round(v) < 0:
        raise DataError(f"{where}: label {v!r} is not a class id (a finite integer >= 0)")
    return round(v)


class RecordIOReader:
    """Random access to an indexed RecordIO file: headers, labels, payloads and decoded images by key.

    Picklable for torch DataLoader workers: the state is the paths and the index arrays; each process opens its
    own descriptor on first read and uses os.pread, so no file position is shared between processes or threads.
    """

    keys: np.ndarray  # int64 [n], sorted: every key of the .idx

    def __init__(self, rec: str | Path, idx: str | Path | None = None) -> None:
        self.rec = Path(rec)
        self.idx = Path(idx) if idx is not None else self.rec.with_suffix(".idx")
        try:
            self._size = self.rec.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{self.rec}: RecordIO file does not exist") from None
        except OSError as e:
            raise DataError(f"{self.rec}: cannot read RecordIO file: {e.strerror}") from e
        self.keys, self._offsets = _read_index(self.idx, self.rec, self._size)
        self._image_keys: np.ndarray | None = None
        self._file: BinaryIO | None = None  # a file object, not a bare descriptor: garbage collection closes it
        self._pid: int | None = None

    # -- process-local file descriptor --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # a descriptor means nothing in another process
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _handle(self) -> int:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            if self._file is not None:
                self._file.close()  # inherited through fork: closing the child's copy leaves the parent's open
            try:
                self._file = open(self.rec, "rb", buffering=0)  # noqa: SIM115  (held open across reads)
            except OSError as e:
                raise DataError(f"{self.rec}: cannot open RecordIO file: {e.strerror}") from e
            self._pid = pid
        return self._file.fileno()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pread(self, offset: int, n: int) -> bytes:
        fd = self._handle()
        return read_at(fd, offset, n)

    # -- container --

    def offset(self, key: int) -> int:
        """Byte offset of `key`'s record in the .rec, from the .idx."""
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            raise DataError(f"{self.idx}: no key {key} in the index ({len(self.keys)} keys)")
        return int(self._offsets[i])

    def _part(self, pos: int, key: int) -> tuple[int, int]:
        """(cflag, length) of the record part at `pos`, checked against the magic word and the file size."""
        head = self._pread(pos, _HEAD.size)
        if len(head) < _HEAD.size:
            raise DataError(f"{self.rec}: record at offset {pos} (key {key}): the file ends inside the record "
                            "header; it is truncated")  # fmt: skip
        magic, lrecord = _HEAD.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{self.rec}: record at offset {pos} (key {key}): bad magic 0x{magic:08x}, "
                            "not a RecordIO record")  # fmt: skip
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        if pos + _HEAD.size + length > self._size:
            raise DataError(f"{self.rec}: record at offset {pos} (key {key}): length {length} runs past the end "
                            f"of the file ({self._size} bytes); it is truncated")  # fmt: skip
        return cflag, length

    def _payload(self, key: int, stop: int | None = None) -> tuple[bytes, int]:
        """(the first `stop` payload bytes, or all of them; the full payload length) of `key`'s record."""
        pos = self.offset(key)
        cflag, length = self._part(pos, key)
        if cflag == 0:  # a whole record: read only what is asked for
            n = length if stop is None else min(stop, length)
            return self._pread(pos + _HEAD.size, n), length
        if cflag != 1:
            raise DataError(f"{self.rec}: record at offset {pos} (key {key}): continuation flag {cflag} where a "
                            "record must start (0 whole, 1 first part)")  # fmt: skip
        parts = [self._pread(pos + _HEAD.size, length)]
        while cflag != 3:  # a split record (dmlc cut out the magic word): join the parts, putting it back
            pos += _HEAD.size + _padded(length)
            cflag, length = self._part(pos, key)
            if cflag not in (2, 3):
                raise DataError(f"{self.rec}: record at offset {pos} (key {key}): continuation flag {cflag} "
                                "inside a split record (expected 2 middle or 3 last)")  # fmt: skip
            parts += [_MAGIC_BYTES, self._pread(pos + _HEAD.size, length)]
        whole = b"".join(parts)
        return (whole if stop is None else whole[:stop]), len(whole)

    def _parse_header(self, raw: bytes, total: int, key: int) -> tuple[IRHeader, int]:
        """IRHeader (+ extra labels) from the payload's first bytes, and where the image bytes start."""
        if total < _IR.size:
            raise DataError(f"{self.rec}: key {key}: record payload is {total} bytes, shorter than the "
                            f"{_IR.size}-byte IRHeader")  # fmt: skip
        flag, label, id_, id2 = _IR.unpack_from(raw)
        if flag == 0:
            return IRHeader(flag, label, id_, id2), _IR.size
        start = _IR.size + 4 * flag
        if start > total:
            raise DataError(f"{self.rec}: key {key}: IRHeader flag {flag} announces {flag} float32 labels "
                            f"({4 * flag} bytes) but only {total - _IR.size} bytes follow the header")  # fmt: skip
        labels = np.frombuffer(raw, dtype="<f4", count=flag, offset=_IR.size).astype(np.float32)
        return IRHeader(flag, labels, id_, id2), start

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        """Header and image payload (the bytes after the header and its extra labels) of one record."""
        raw, total = self._payload(key)
        header, start = self._parse_header(raw, total, key)
        return header, raw[start:]

    def header(self, key: int) -> IRHeader:
        """Header (and extra labels) only; the image bytes are not read."""
        raw, total = self._payload(key, _HEADER_PREFIX)
        if total >= _IR.size:
            flag = _IR.unpack_from(raw)[0]
            need = _IR.size + 4 * flag
            if len(raw) < need <= total:  # more than 8 extra labels: read the rest of them
                raw, total = self._payload(key, need)
        return self._parse_header(raw, total, key)[0]

    # -- insightface face layout --

    def _is_header_record(self, key: int) -> bool:
        # face2rec2 packs record 0 (and the identity records) with an empty payload and flag > 0; an image record
        # with several labels also has flag > 0 (RecBuilder.add_image with a list), but never an empty payload.
        raw, total = self._payload(key, _HEADER_PREFIX)
        header, start = self._parse_header(raw, total, key)
        return header.flag > 0 and total == start

    def image_keys(self) -> np.ndarray:
        """int64 keys of the image records: 1 .. label[0] - 1 when key 0 is an insightface header, else all keys."""
        if self._image_keys is None:
            self._image_keys = self._find_image_keys()
        return self._image_keys

    def _find_image_keys(self) -> np.ndarray:
        if self.keys[0] != 0 or not self._is_header_record(0):
            return self.keys
        label = self.header(0).label
        assert isinstance(label, np.ndarray)  # flag > 0
        end = _class_id(label[0], f"{self.rec}: key 0 (insightface header record, label[0] = end of the images)")
        keys = np.arange(1, end, dtype=np.int64)
        pos = np.searchsorted(self.keys, keys)
        missing = keys[(pos >= len(self.keys)) | (self.keys[np.minimum(pos, len(self.keys) - 1)] != keys)]
        if missing.size:
            raise DataError(f"{self.rec}: header record (key 0) says images are keys 1..{end - 1}, but key "
                            f"{missing[0]} is not in {self.idx} ({missing.size} missing)")  # fmt: skip
        keys.flags.writeable = False
        return keys

    def label(self, key: int) -> int:
        """Class id of one record: its header label, or its first extra label when flag > 0 (as MXFaceDataset)."""
        header = self.header(key)
        value = header.label[0] if isinstance(header.label, np.ndarray) else header.label
        return _class_id(value, f"{self.rec}: key {key}")

    def labels(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64 class ids of `keys`, reading headers only."""
        return np.fromiter((self.label(int(k)) for k in keys), dtype=np.int64, count=len(keys))

    def decode(self, key: int, channels: int = 3) -> np.ndarray:
        """The record's image as uint8 [H, W, 3] RGB (or [H, W] for channels=1)."""
        _, payload = self.read(key)
        if not payload:
            raise DataError(f"{self.rec}: key {key}: the record holds no image bytes (a header record?)")
        return decode_image_bytes(payload, f"{self.rec} (key {key})", channels)

    def property(self) -> tuple[int, int, int] | None:
        """(num_classes, H, W) from the `property` file beside the .rec; None when there is none."""
        path = self.rec.parent / "property"
        try:
            lines = path.read_text(encoding="ascii").splitlines()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read: {e}") from e
        first = lines[0].strip() if lines else ""
        fields = [f.strip() for f in first.split(",")]
        if len(fields) != 3 or not all(re.fullmatch(r"\d+", f) for f in fields):
            raise DataError(f"{path}: line 1: expected 'num_classes,H,W' (three integers), got {first[:80]!r}")
        num_classes, height, width = (int(f) for f in fields)
        return num_classes, height, width
