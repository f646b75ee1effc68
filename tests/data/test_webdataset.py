"""WebDataset tar shards: header-only index, random-access reads, brace notation, errors naming shard and key."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from components.data.recordio import encode_image
from components.data.webdataset import (
    ShardEntry,
    decode_entry,
    expand_shards,
    index_shards,
    read_image_bytes,
    write_shards,
)
from components.errors import DataError


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    """A shard written with plain tarfile, independently of write_shards."""
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(value: int) -> bytes:
    return encode_image(np.full((3, 4, 3), value, np.uint8), "PNG")


@pytest.fixture
def shards(tmp_path: Path) -> tuple[list[Path], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = {f"s{i}": rng.integers(0, 256, (5, 4 + i, 3), dtype=np.uint8) for i in range(5)}
    identities = ["12", "alice", "12", "007", "bob"]
    samples = [(k, ident, encode_image(a, "PNG"), "png") for (k, a), ident in zip(arrays.items(), identities)]
    return write_shards(tmp_path / "wds", samples, per_shard=3), arrays


def test_index_and_decode_round_trip_across_two_shards(shards: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    paths, arrays = shards
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]
    entries = index_shards(paths)
    assert [e.key for e in entries] == list(arrays)
    assert [e.identity for e in entries] == ["12", "alice", "12", "007", "bob"]  # "007" kept: json, not cls
    assert [Path(e.shard).name for e in entries] == ["shard-000000.tar"] * 3 + ["shard-000001.tar"] * 2
    for entry in entries:
        np.testing.assert_array_equal(decode_entry(entry), arrays[entry.key])
    assert decode_entry(entries[0], channels=1).shape == (5, 4)


def test_offsets_point_at_the_member_data(shards: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    paths, _ = shards
    entries = index_shards(paths)
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert names == ["s0.png", "s0.cls", "s1.png", "s1.json", "s2.png", "s2.cls"]
        assert json.loads(tar.extractfile("s1.json").read()) == {"identity": "alice"}
        for entry in entries[:3]:
            member = tar.getmember(f"{entry.key}.png")
            assert (entry.offset, entry.size) == (member.offset_data, member.size)
            assert read_image_bytes(entry) == tar.extractfile(member).read()


def test_shards_written_by_other_tools(tmp_path: Path) -> None:
    jpg = encode_image(np.full((8, 8, 3), 120, np.uint8), "JPEG")
    shard = _tar(
        tmp_path / "a.tar",
        {
            "__meta__": b"skipped",
            "dir/x1.JPG": jpg,  # extension lower-cased, directory kept in the key, as webdataset does
            "dir/x1.cls": b" 3\n",
            "dir/x1.seg.png": _png(1),  # "seg.png" is not an image extension of the sample
            "y2.webp": encode_image(np.zeros((2, 2, 3), np.uint8), "WEBP"),
            "y2.json": json.dumps({"identity": 41, "age": 30}).encode(),
            "y2.cls": b"5",  # cls wins over json
        },
    )
    entries = index_shards([shard])
    assert [(e.key, e.identity) for e in entries] == [("dir/x1", "3"), ("y2", "5")]
    assert np.abs(decode_entry(entries[0]).astype(int) - 120).max() <= 2
    assert decode_entry(entries[1]).shape == (2, 2, 3)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"a.jpg": b"x"}, r"key 'a' has no label member"),
        ({"a.cls": b"1"}, r"key 'a' has no image member"),
        ({"a.jpg": b"x", "a.png": b"y", "a.cls": b"1"}, r"key 'a' has 2 image members"),
        ({"a.jpg": b"x", "a.cls": b"one"}, r"a\.cls: expected an integer class"),
        ({"a.jpg": b"x", "a.json": b'{"name": "z"}'}, r'a\.json: expected a JSON object with an "identity"'),
        ({"a.jpg": b"x", "a.json": b"{oops"}, r"a\.json: invalid JSON"),
        ({"a.jpg": b"x", "a.json": b'{"identity": true}'}, r'a\.json: expected a JSON object with an "identity"'),
    ],
    ids=["no-label", "no-image", "two-images", "bad-cls", "no-identity", "bad-json", "bool-identity"],
)
def test_incomplete_samples_name_shard_and_key(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    shard = _tar(tmp_path / "bad.tar", members)
    with pytest.raises(DataError, match=message) as info:
        index_shards([shard])
    assert str(shard) in str(info.value)


def test_duplicate_keys(tmp_path: Path) -> None:
    first = _tar(tmp_path / "a.tar", {"k.png": _png(0), "k.cls": b"1"})
    second = _tar(tmp_path / "b.tar", {"k.png": _png(1), "k.cls": b"2"})
    with pytest.raises(DataError, match=r"key 'k' is also in .*a\.tar") as info:
        index_shards([first, second])
    assert str(second) in str(info.value)
    twice = _tar(tmp_path / "c.tar", {"k.png": _png(0), "k.cls": b"1", "j.cls": b"2", "k.PNG": _png(1)})
    with pytest.raises(DataError, match=r"k\.PNG: key 'k' has two 'png' members"):
        index_shards([twice])


def test_unreadable_shards(tmp_path: Path, shards: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    gz = _tar(tmp_path / "z.tar.gz", {"k.png": _png(0), "k.cls": b"1"}, mode="w:gz")
    with pytest.raises(DataError, match="uncompressed") as info:
        index_shards([gz])
    assert str(gz) in str(info.value)
    with pytest.raises(DataError, match="shard does not exist"):
        index_shards([tmp_path / "none.tar"])

    paths, _ = shards
    entries = index_shards(paths)
    paths[1].write_bytes(paths[1].read_bytes()[: entries[3].offset + 10])  # cut inside s3's image
    with pytest.raises(DataError, match="truncated|unexpected end of data") as info:
        index_shards(paths)
    assert str(paths[1]) in str(info.value)
    with pytest.raises(DataError, match="truncated"):
        read_image_bytes(entries[3])


@pytest.mark.parametrize("where", ["inside-header", "at-boundary", "garbage"])
def test_a_shard_cut_between_members_is_not_silently_shorter(tmp_path: Path, where: str) -> None:
    # tarfile stops without an error at a broken header after the first member: the index must not lose samples
    shard = _tar(tmp_path / "s.tar", {"a.png": _png(0), "a.cls": b"1", "b.png": _png(1), "b.cls": b"2"})
    with tarfile.open(shard) as tar:
        header = tar.getmember("b.png").offset  # b.png's header block
    blob = shard.read_bytes()
    cut = {
        "inside-header": blob[: header + 100],
        "at-boundary": blob[:header],
        "garbage": blob[:header] + b"\x07" * 512 + blob[header + 512 :],
    }[where]
    shard.write_bytes(cut)
    with pytest.raises(DataError, match=rf"at offset {header}: neither a tar header nor the end-of-archive") as info:
        index_shards([shard])
    assert str(shard) in str(info.value)


def test_expand_brace_folder_and_glob(tmp_path: Path, shards: tuple[list[Path], dict[str, np.ndarray]]) -> None:
    paths, _ = shards
    folder = paths[0].parent
    assert expand_shards(str(folder / "shard-{000000..000001}.tar")) == paths
    assert expand_shards(str(folder / "shard-{000001..000000}.tar")) == paths[::-1]
    assert expand_shards(str(folder / "shard-00000{0,1}.tar")) == paths
    assert expand_shards(str(folder)) == paths
    assert expand_shards(str(folder / "shard-*.tar")) == paths
    with pytest.raises(DataError, match=r"shard-000002\.tar: shard does not exist \(from .*\{000000\.\.000002\}"):
        expand_shards(str(folder / "shard-{000000..000002}.tar"))
    with pytest.raises(DataError, match="no shard matches"):
        expand_shards(str(folder / "nope-*.tar"))
    with pytest.raises(DataError, match="braces"):
        expand_shards(str(folder / "shard-{0..1.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.tar shards"):
        expand_shards(str(tmp_path / "empty"))


def test_brace_padding_follows_braceexpand(tmp_path: Path) -> None:
    for name in ["p-8.tar", "p-9.tar", "p-10.tar", "q-08.tar", "q-09.tar", "q-10.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_shards(str(tmp_path / "p-{8..10}.tar"))] == ["p-8.tar", "p-9.tar", "p-10.tar"]
    assert [p.name for p in expand_shards(str(tmp_path / "q-{08..10}.tar"))] == ["q-08.tar", "q-09.tar", "q-10.tar"]


def test_write_shards_refuses_bad_samples(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image extension 'gif'"):
        write_shards(tmp_path, [("a", "1", b"x", "gif")])
    with pytest.raises(ValueError, match="without a dot"):
        write_shards(tmp_path, [("a.b", "1", b"x", "png")])
    with pytest.raises(ValueError, match="given twice"):
        write_shards(tmp_path, [("a", "1", b"x", "png"), ("a", "2", b"y", "png")])
    assert write_shards(tmp_path / "none", []) == []


def test_entry_is_a_small_frozen_record() -> None:
    entry = ShardEntry("s.tar", "k", 512, 10, "7")
    with pytest.raises(AttributeError):
        entry.key = "other"  # type: ignore[misc]
