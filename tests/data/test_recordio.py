"""insightface / MXNet RecordIO sets: container, header record, labels, split records, errors that name the file."""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from components.data import recordio
from components.data.recordio import RecordIOReader, encode_image, write_recordio
from components.errors import DataError

MAGIC = struct.pack("<I", 0xCED7230A)


# An encoder written from dmlc recordio.h / mxnet recordio.py directly, independent of the module's writer, so
# the reader is checked against the format and not only against itself. No splitting: payloads here hold no magic.
def _raw_record(payload: bytes) -> bytes:
    assert MAGIC not in payload
    return MAGIC + struct.pack("<I", len(payload)) + payload + bytes(-len(payload) % 4)


def _ir(flag: int, label: float, key: int, labels: tuple[float, ...] = ()) -> bytes:
    return struct.pack("<IfQQ", flag, label, key, 0) + np.asarray(labels, dtype="<f4").tobytes()


def _write_raw(rec: Path, records: dict[int, bytes]) -> Path:
    offsets, blob = {}, b""
    for key, payload in records.items():
        offsets[key] = len(blob)
        blob += _raw_record(payload)
    rec.write_bytes(blob)
    rec.with_suffix(".idx").write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    return rec


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (6 + i % 3, 5, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture
def faces(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[int]]:
    images = _images(6)
    labels = [0, 0, 1, 1, 2, 2]
    rec = write_recordio(
        tmp_path / "train.rec", [(float(y), encode_image(a, "PNG")) for y, a in zip(labels, images)], property=(3, 6, 5)
    )
    return rec, images, labels


def test_round_trip_png_labels_and_pixels_exact(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, images, labels = faces
    reader = RecordIOReader(rec)
    np.testing.assert_array_equal(reader.keys, np.arange(7))
    np.testing.assert_array_equal(reader.image_keys(), np.arange(1, 7))
    labels_read = reader.labels(reader.image_keys())
    assert labels_read.dtype == np.int64 and labels_read.tolist() == labels
    for key, image in zip(reader.image_keys(), images):
        np.testing.assert_array_equal(reader.decode(int(key)), image)
    gray = reader.decode(1, channels=1)
    assert gray.shape == images[0].shape[:2] and gray.dtype == np.uint8
    assert reader.property() == (3, 6, 5)


def test_header_record_is_insightface_key_0(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, images, _ = faces
    reader = RecordIOReader(rec)
    header, payload = reader.read(0)
    assert header.flag == 2 and payload == b""
    # face2rec2 / MXFaceDataset: label[0] is one past the last image key (images are range(1, label[0]))
    np.testing.assert_array_equal(header.label, [len(images) + 1, len(images) + 1])
    assert list(range(1, int(header.label[0]))) == reader.image_keys().tolist()
    one = reader.header(3)
    assert one.flag == 0 and one.label == 1.0 and one.id == 3


def test_ms1m_layout_identity_records_are_not_images(tmp_path: Path) -> None:
    """MS1M: key 0 = (first identity record, end), images 1..4, identity records 5..6 with image key ranges."""
    png = encode_image(np.zeros((4, 4, 3), np.uint8), "PNG")
    records = {0: _ir(2, 0.0, 0, (5.0, 7.0))}
    records |= {k: _ir(0, float(k > 2), k) + png for k in range(1, 5)}
    records |= {5: _ir(2, 0.0, 5, (1.0, 3.0)), 6: _ir(2, 0.0, 6, (3.0, 5.0))}
    reader = RecordIOReader(_write_raw(tmp_path / "train.rec", records))
    np.testing.assert_array_equal(reader.image_keys(), [1, 2, 3, 4])
    assert reader.labels([1, 2, 3, 4]).tolist() == [0, 0, 1, 1]
    assert reader.property() is None


def test_without_header_every_key_is_an_image(tmp_path: Path) -> None:
    images = _images(3)
    rec = write_recordio(tmp_path / "x.rec", [(7.0, encode_image(a, "PNG")) for a in images], header_record=False)
    reader = RecordIOReader(rec)
    np.testing.assert_array_equal(reader.image_keys(), [0, 1, 2])
    np.testing.assert_array_equal(reader.decode(0), images[0])


def test_multi_label_image_at_key_0_is_not_taken_for_a_header(tmp_path: Path) -> None:
    # RecBuilder.add_image with a list label: flag > 0 on an image record, which has a non-empty payload
    png = encode_image(np.full((3, 3, 3), 9, np.uint8), "PNG")
    rec = write_recordio(tmp_path / "x.rec", [([4.0, 1.0], png), (2.0, png)], header_record=False)
    reader = RecordIOReader(rec)
    np.testing.assert_array_equal(reader.image_keys(), [0, 1])
    assert reader.labels([0, 1]).tolist() == [4, 2]  # the first extra label, as MXFaceDataset takes it


def test_jpeg_round_trip_is_close(tmp_path: Path) -> None:
    y, x = np.mgrid[0:32, 0:32]
    smooth = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)  # [32, 32, 3]
    rec = write_recordio(tmp_path / "j.rec", [(0.0, encode_image(smooth, "JPEG", quality=95))])
    decoded = RecordIOReader(rec).decode(1)
    assert decoded.shape == smooth.shape
    assert np.abs(decoded.astype(int) - smooth).mean() < 3


def test_float_labels_cast_with_care(tmp_path: Path) -> None:
    png = encode_image(np.zeros((2, 2), np.uint8), "PNG")
    bad = [3.5, math.nan, -1.0, math.inf]
    rec = write_recordio(tmp_path / "l.rec", [(v, png) for v in [2.0, 2.0004, *bad]], header_record=False)
    reader = RecordIOReader(rec)
    assert reader.label(0) == 2 and reader.label(1) == 2
    for key, value in enumerate(bad, start=2):
        with pytest.raises(DataError, match="is not a class id") as info:
            reader.label(key)
        message = str(info.value)
        assert str(rec) in message and f"key {key}" in message and repr(float(value)) in message
    with pytest.raises(DataError, match="key 2"):
        reader.labels([0, 1, 2])


def test_record_holding_the_magic_word_is_split_and_joined_byte_exactly(tmp_path: Path) -> None:
    # after the 24-byte header: magic at aligned payload offsets 24, 28 (twice in a row) and 40; one unaligned
    payload = MAGIC + MAGIC + b"abcd" + b"ef" + MAGIC + b"gh" + MAGIC + b"xyz"
    assert payload.index(MAGIC, 13) == 14  # the third one sits at 24 + 14: not 4-aligned, so not cut
    rec = write_recordio(tmp_path / "m.rec", [(1.0, payload), (2.0, b"plain")], header_record=False)
    reader = RecordIOReader(rec)
    header, read = reader.read(0)
    assert read == payload and header.label == 1.0 and reader.read(1)[1] == b"plain"

    # on disk: dmlc's cflag sequence 1, 2, 2, 3 and part lengths between the cut magic words
    blob, pos, parts = rec.read_bytes(), 0, []
    while True:
        magic, lrec = struct.unpack_from("<II", blob, pos)
        assert magic == 0xCED7230A
        parts.append((lrec >> 29, lrec & ((1 << 29) - 1)))
        pos += 8 + -(-(lrec & ((1 << 29) - 1)) // 4) * 4
        if parts[-1][0] in (0, 3):
            break
    assert parts == [(1, 24), (2, 0), (2, 12), (3, 3)]
    assert reader.offset(1) == pos  # the next record starts right after the last part


def test_bad_magic_names_file_offset_and_key(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, _, _ = faces
    reader = RecordIOReader(rec)
    offset = reader.offset(2)
    blob = bytearray(rec.read_bytes())
    blob[offset : offset + 4] = b"JUNK"
    rec.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"bad magic 0x4b4e554a, not a RecordIO record") as info:
        RecordIOReader(rec).read(2)
    assert str(rec) in str(info.value) and f"offset {offset} (key 2)" in str(info.value)


def test_truncated_rec_is_a_data_error(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, _, _ = faces
    reader = RecordIOReader(rec)
    last = reader.offset(6)
    rec.write_bytes(rec.read_bytes()[: last + 20])  # the last record's header is there, its payload is not
    with pytest.raises(DataError, match="truncated") as info:
        RecordIOReader(rec).decode(6)
    assert str(rec) in str(info.value) and "key 6" in str(info.value)

    rec.write_bytes(rec.read_bytes()[: last - 8])  # now the .idx points past the end
    with pytest.raises(DataError, match=r"line 7: offset \d+ \(key 6\) is beyond the end") as info:
        RecordIOReader(rec)
    assert str(rec.with_suffix(".idx")) in str(info.value)


@pytest.mark.parametrize(
    ("line", "number"), [("3\tabc", 2), ("3", 2), ("-1\t0", 2), ("1\t0\t9", 2)], ids=["text", "one", "neg", "three"]
)
def test_bad_idx_line_names_the_line(faces: tuple[Path, list[np.ndarray], list[int]], line: str, number: int) -> None:
    rec, _, _ = faces
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0], line, *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=f"line {number}: expected 'key<TAB>offset'") as info:
        RecordIOReader(rec)
    assert str(idx) in str(info.value)


def test_missing_files_and_keys(tmp_path: Path, faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, _, _ = faces
    with pytest.raises(DataError, match="does not exist"):
        RecordIOReader(tmp_path / "none.rec")
    with pytest.raises(DataError, match="no key 99"):
        RecordIOReader(rec).read(99)
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text() + "3\t0\n")
    with pytest.raises(DataError, match="key 3 is listed more than once"):
        RecordIOReader(rec)
    idx.unlink()
    with pytest.raises(DataError, match="index does not exist") as info:
        RecordIOReader(rec)
    assert str(idx) in str(info.value)


def test_short_header_and_missing_extra_labels(tmp_path: Path) -> None:
    rec = _write_raw(tmp_path / "h.rec", {0: b"0123456789", 1: _ir(100, 0.0, 1, (1.0, 2.0))})
    reader = RecordIOReader(rec)
    with pytest.raises(DataError, match="10 bytes, shorter than the 24-byte IRHeader") as info:
        reader.read(0)
    assert str(rec) in str(info.value) and "key 0" in str(info.value)
    with pytest.raises(DataError, match="flag 100 announces 100 float32 labels"):
        reader.header(1)


def test_many_extra_labels_are_read_past_the_prefix(tmp_path: Path) -> None:
    labels = tuple(float(i) for i in range(20))  # more than the 8 labels of the first, short read
    rec = _write_raw(tmp_path / "e.rec", {0: _ir(20, 0.0, 0, labels) + b"IMG"})
    header = RecordIOReader(rec).header(0)
    np.testing.assert_array_equal(header.label, labels)
    assert RecordIOReader(rec).read(0)[1] == b"IMG"


def test_corrupt_image_names_file_and_key(tmp_path: Path) -> None:
    rec = write_recordio(tmp_path / "c.rec", [(0.0, b"\xff\xd8 not really a jpeg")])
    with pytest.raises(DataError, match="cannot decode image") as info:
        RecordIOReader(rec).decode(1)
    assert f"{rec} (key 1)" in str(info.value)


def test_bad_property_file(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, _, _ = faces
    (rec.parent / "property").write_text("85742,112,112\n5822653\n")  # RecBuilder's second line is fine
    assert RecordIOReader(rec).property() == (85742, 112, 112)
    (rec.parent / "property").write_text("85742;112;112\n")
    with pytest.raises(DataError, match="line 1: expected 'num_classes,H,W'"):
        RecordIOReader(rec).property()


def test_writer_is_atomic(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, _, _ = faces
    before = {p.name: p.read_bytes() for p in rec.parent.iterdir()}

    def failing():
        yield 0.0, b"one"
        raise RuntimeError("the source died")

    with pytest.raises(RuntimeError):
        write_recordio(rec, failing())
    assert {p.name: p.read_bytes() for p in rec.parent.iterdir()} == before  # old files intact, no temp files


def test_reader_pickles_without_its_handle(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    rec, images, _ = faces
    reader = RecordIOReader(rec)
    reader.decode(1)  # opens this process's handle
    state = reader.__getstate__()
    assert state["_file"] is None and state["_pid"] is None
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.decode(4), images[3])
    np.testing.assert_array_equal(clone.image_keys(), reader.image_keys())
    reader.close()
    clone.close()


def test_reader_in_dataloader_workers(faces: tuple[Path, list[np.ndarray], list[int]]) -> None:
    torch = pytest.importorskip("torch")
    rec, images, labels = faces
    reader = RecordIOReader(rec)
    keys = reader.image_keys()
    expected_first = reader.decode(int(keys[0]))  # the parent's handle is open before the workers fork

    class Faces(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(keys)

        def __getitem__(self, i: int) -> tuple[int, int]:
            return int(reader.decode(int(keys[i])).sum()), reader.label(int(keys[i]))

    loader = torch.utils.data.DataLoader(Faces(), batch_size=2, num_workers=2)
    sums, got = zip(*((s, y) for batch in loader for s, y in zip(*batch)))
    assert [int(s) for s in sums] == [int(a.sum()) for a in images]
    assert [int(y) for y in got] == labels
    np.testing.assert_array_equal(reader.decode(int(keys[0])), expected_first)  # the parent's handle still works


def test_encode_image_refuses_wrong_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4), np.float32))
    assert recordio.decode_image_bytes(encode_image(np.zeros((4, 4, 1), np.uint8), "PNG"), "x").shape == (4, 4, 3)
