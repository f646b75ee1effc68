"""insightface verification .bin sets: safe loading (no globals ever run), structure checks, decoding, scoring."""

from __future__ import annotations

import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from components.data.recordio import encode_image
from components.data.verification import decode_bin_images, load_bin, verification_metrics, write_bin
from components.errors import DataError


def _pngs(n: int, size: int = 6) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return [encode_image(a, "PNG") for a in arrays], arrays


def test_round_trip(tmp_path: Path) -> None:
    images, arrays = _pngs(6)
    path = write_bin(tmp_path / "lfw.bin", images, [True, False, True])
    loaded, issame = load_bin(path)
    assert loaded == images
    assert issame.dtype == bool and issame.tolist() == [True, False, True]
    decoded = decode_bin_images(loaded)
    assert decoded.shape == (6, 6, 6, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.stack(arrays))
    assert decode_bin_images(loaded, size=4, channels=1).shape == (6, 4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["lfw.bin"]  # written atomically: no temp file left


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def _by_reduce(marker: Path) -> bytes:
    return pickle.dumps(([_Payload(f"touch {marker}")], [True]), protocol=4)


def _by_opcodes(marker: Path) -> bytes:
    # protocol 0 by hand: GLOBAL 'os system', MARK, STRING, TUPLE, REDUCE, STOP
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


@pytest.mark.parametrize("build", [_by_reduce, _by_opcodes], ids=["reduce", "opcodes"])
def test_a_global_is_refused_without_running(tmp_path: Path, build) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(build(marker))
    with pytest.raises(DataError, match=r"asks for the global (os|posix)\.system") as info:
        load_bin(path)
    assert str(path) in str(info.value)
    assert not marker.exists()  # the command never ran


def test_numpy_arrays_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([b"x", b"y"], np.array([True])), protocol=4))
    with pytest.raises(DataError, match=r"global numpy"):
        load_bin(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"images": [], "issame": []}, r"expected a pickled pair \(images, issame\), found dict"),
        (([b"a", b"b"], [True], "extra"), r"found a tuple of 3"),
        (("ab", [True]), r"images: expected a list of encoded image bytes, found str"),
        (([b"a", "b"], [True]), r"images\[1\]: expected encoded image bytes, found str"),
        (([b"a", b"b"], [1]), r"issame\[0\]: expected a bool, found int 1"),
        (([b"a", b"b"], (True, None)), r"issame\[1\]: expected a bool, found NoneType"),
        (([b"a", b"b", b"c"], [True]), r"3 images for 1 is-same flags"),
        (([], []), r"holds no pairs"),
    ],
    ids=["dict", "triple", "str-images", "str-image", "int-flag", "none-flag", "odd", "empty"],
)
def test_wrong_structure_is_refused(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(DataError, match=message) as info:
        load_bin(path)
    assert str(path) in str(info.value)


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's pickle.dump((bins, issame_list), f, protocol=2) writes: str as BINSTRING, bools as NEWTRUE."""
    out = b"\x80\x02" + b"]q\x00(" + b"".join(b"T" + struct.pack("<i", len(b)) + b for b in images) + b"e"
    out += b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"
    return out + b"\x86q\x02."


def test_python2_protocol_2_file_loads(tmp_path: Path) -> None:
    images, arrays = _pngs(4)
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(_py2_pickle(images, [False, True]))
    loaded, issame = load_bin(path)
    assert loaded == images and all(type(b) is bytes for b in loaded)
    assert issame.tolist() == [False, True]
    np.testing.assert_array_equal(decode_bin_images(loaded)[3], arrays[3])


def test_python3_protocol_2_bytes_need_a_global_and_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "py3p2.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [True]), protocol=2))  # bytes go through _codecs.encode
    with pytest.raises(DataError, match=r"_codecs\.encode"):
        load_bin(path)


@pytest.mark.parametrize("blob", [b"", b"\x80\x04garbage", b"not a pickle at all"], ids=["empty", "bad", "text"])
def test_corrupt_file_is_a_data_error(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(blob)
    with pytest.raises(DataError, match="not a verification .bin pickle") as info:
        load_bin(path)
    assert str(path) in str(info.value)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    images, _ = _pngs(2)
    path = write_bin(tmp_path / "t.bin", images, [True])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="not a verification .bin pickle"):
        load_bin(path)
    with pytest.raises(DataError, match="does not exist"):
        load_bin(tmp_path / "none.bin")


def test_decode_needs_a_common_size_or_a_resize(tmp_path: Path) -> None:
    a = encode_image(np.zeros((4, 4, 3), np.uint8), "PNG")
    b = encode_image(np.zeros((5, 4, 3), np.uint8), "PNG")
    with pytest.raises(DataError, match="image 1 is 4x5, image 0 is 4x4") as info:
        decode_bin_images([a, b], source=tmp_path / "cfp_fp.bin")
    assert "cfp_fp.bin" in str(info.value)
    assert decode_bin_images([a, b], size=3).shape == (2, 3, 3, 3)
    with pytest.raises(DataError, match="image 1: cannot decode image"):
        decode_bin_images([a, b"junk"])


# --- scoring ------------------------------------------------------------------------------------------------


def _at_angles(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose cosine similarity is cos(angle): a = e1, b rotated by the angle in the e1-e2 plane."""
    a = np.tile([1.0, 0.0, 0.0], (len(angles), 1))
    b = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=1)
    return a, b


def test_identical_genuine_pairs_score_perfectly() -> None:
    rng = np.random.default_rng(0)
    n_genuine, n_impostor = 100, 200
    a = rng.normal(size=(n_genuine + n_impostor, 8))
    b = np.concatenate([a[:n_genuine] * 3.0, -a[n_genuine:] + 0.01 * rng.normal(size=(n_impostor, 8))])
    issame = np.arange(len(a)) < n_genuine
    order = rng.permutation(len(a))  # genuine and impostor pairs interleaved over the folds
    m = verification_metrics(a[order], b[order], issame[order])
    assert m["accuracy"] == 1.0 and m["accuracy_std"] == 0.0
    assert m["pairs"] == 300 and m["impostor_pairs"] == 200
    assert m["tar@far=1e-2"] == 1.0
    assert math.isnan(m["tar@far=1e-3"])  # 200 impostor pairs cannot resolve 1e-3
    assert m["min_resolvable_far"] == pytest.approx(1 / 200)


def test_known_tar_at_far() -> None:
    # 100 impostors at similarities cos(1.0 + k/100) (the top one cos(1.0)); 10 genuine pairs, 7 above the top
    # impostor, 3 below all impostors. FAR 1e-2 admits exactly the top impostor: TAR = 7/10.
    impostor = 1.0 + np.arange(100) / 100
    genuine = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 2.5, 2.6, 2.7])
    a, b = _at_angles(np.concatenate([genuine, impostor]))
    issame = np.arange(110) < 10
    m = verification_metrics(a, b, issame, fars=(1e-2, 0.05), folds=5)
    assert m["tar@far=1e-2"] == pytest.approx(0.7)
    assert m["tar@far=5e-2"] == pytest.approx(0.7)
    assert m["impostor_pairs"] == 100


def test_accuracy_uses_held_out_folds() -> None:
    # 20 pairs, 10 folds of 2 (KFold without shuffling): pair 2k genuine at angle 0.1, pair 2k + 1 impostor at 2.0,
    # except pair 0, a genuine pair at angle 3.0, below every impostor: its fold scores 1/2, all others 1.
    angles = np.where(np.arange(20) % 2 == 0, 0.1, 2.0)
    angles[0] = 3.0
    issame = np.arange(20) % 2 == 0
    a, b = _at_angles(angles)
    m = verification_metrics(a, b, issame, fars=())
    folds = np.array([0.5] + [1.0] * 9)
    assert m["accuracy"] == pytest.approx(folds.mean())
    assert m["accuracy_std"] == pytest.approx(folds.std())


def test_cross_model_pairs_and_bad_inputs() -> None:
    a, b = _at_angles(np.array([0.0, 0.1, 2.0, 2.5]))
    issame = np.array([True, True, False, False])
    assert verification_metrics(a, b, issame, folds=2)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="do not describe the same pairs"):
        verification_metrics(a, b[:3], issame)
    with pytest.raises(ValueError, match="folds must be between 2 and the number of pairs"):
        verification_metrics(a, b, issame, folds=10)
    with pytest.raises(ValueError, match="issame must be bool"):
        verification_metrics(a, b, issame.astype(int), folds=2)
    with pytest.raises(ValueError, match="NaN or inf"):
        verification_metrics(a * np.nan, b, issame, folds=2)
