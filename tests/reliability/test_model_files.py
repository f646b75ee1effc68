"""Model, gallery and image files as users have them: external data, lying suffixes, odd dtypes, 16-bit, huge."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cases import case
from typer.testing import CliRunner

from components.embed import OnnxEmbedder, load_embedder, model_sha256, save_backbone
from components.errors import DataError
from components.models import build_backbone
from flows.cli import app

runner = CliRunner()
N_GALLERY, SIZE, DIM = 6, 4, 8  # the hand-built ONNX embedders: [n, 1, 4, 4] -> [n, 8]


# ------------------------------------------------------------------------------------------------ helpers


def _onnx(path: Path, in_type: int = 1, out_type: int = 1, location: str | None = None) -> np.ndarray:
    """x (in_type) -> Cast(float) -> Flatten -> MatMul W -> Cast(out_type) -> y; returns W [16, 8].

    `location`: keep W in that external data file, relative to the model's folder.
    """
    from onnx import TensorProto, helper, numpy_helper, save_model

    w = np.random.default_rng(0).uniform(-0.5, 0.5, (SIZE * SIZE, DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["xf"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["yf"]),
        helper.make_node("Cast", ["yf"], ["y"], to=out_type),
    ]
    graph = helper.make_graph(
        nodes, "embedder", [helper.make_tensor_value_info("x", in_type, ["n", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("y", out_type, ["n", DIM])], [numpy_helper.from_array(w, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    if location is None:
        save_model(model, str(path))
    else:
        (path.parent / location).parent.mkdir(parents=True, exist_ok=True)
        save_model(model, str(path), save_as_external_data=True, location=location, size_threshold=0)
    return w


def _x(n: int = 5) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (n, 1, SIZE, SIZE)).astype(np.float32)  # [n, 1, H, W]


def _legacy(tmp_path: Path, model: Path, gallery: Path | None = None) -> tuple[object, Path]:
    """`mixbct stage legacy` importing `model` (and a gallery), on a work folder holding only a manifest."""
    work = tmp_path / "work"
    (work / "dataset").mkdir(parents=True)
    rows = "".join(f"g{i},faces/id{i}/0.png,0,id{i},gallery,{i}\n" for i in range(N_GALLERY))
    (work / "dataset" / "manifest.csv").write_text("id,source,sample,identity,split,label\n" + rows)
    if gallery is None:
        gallery = tmp_path / "gallery.npy"
        np.save(gallery, np.ones((N_GALLERY, DIM), dtype=np.float32))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"old": {"model": str(model), "gallery": str(gallery)}}))
    result = runner.invoke(app, ["stage", "legacy", "--params", str(params), "--workdir", str(work)])
    return result, work


def _refused(result: object, work: Path, name: str) -> str:
    """Exit 1, one line naming `name`, no torch advice, no traceback, and nothing written by the stage."""
    out = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 1, out  # type: ignore[attr-defined]
    assert len(out.strip().splitlines()) == 1, out
    assert name in out and "weights_only=False" not in out and "Traceback" not in out
    assert sorted(p.name for p in work.iterdir()) == [".lock", ".mixbct-workdir", "dataset"]  # no legacy/, no temp folder
    return out


def _png16(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit-per-sample PNG (PIL writes 16-bit grayscale, not 16-bit RGB): color type 0 gray, 2 RGB."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height but holds 100 pixels: decoding it fails ("truncated"), a header check
    names its size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _faces(root: Path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(8):
        (root / f"id{i}").mkdir(parents=True, exist_ok=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / f"id{i}" / f"{j}.png")
            files.append(root / f"id{i}" / f"{j}.png")
    return files


# ------------------------------------------------------------------------------------------------ .pt files


@case("model files", "old model is a 0-byte .pt",
      "exit 1, one line naming the file ('not a checkpoint written by this project'); nothing written")  # fmt: skip
def test_empty_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "old.pt").write_bytes(b"")
    result, work = _legacy(tmp_path, tmp_path / "old.pt")
    assert "not a checkpoint written by this project (empty file" in _refused(result, work, "old.pt")


@case("model files", "old .pt is truncated, a bare tensor, another program's pickle or a zip of something else",
      "exit 1, one line naming the file and why; torch's `weights_only=False` advice is never shown")  # fmt: skip
@pytest.mark.parametrize("kind", ["truncated", "tensor", "pickle", "zip"])
def test_foreign_checkpoint(kind: str, tmp_path: Path) -> None:
    import pickle
    import zipfile

    path = tmp_path / "old.pt"
    if kind == "truncated":
        save_backbone(build_backbone("small_cnn", DIM, 32), path, "small_cnn", DIM, 32)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"arch": "small_cnn"}))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    result, work = _legacy(tmp_path, path)
    _refused(result, work, "old.pt")
    with pytest.raises(DataError, match=r"old\.pt: not a checkpoint written by this project \(") as err:
        load_embedder(path)
    assert "\n" not in str(err.value)


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@case("model files", "old .pt is a pickle that runs a shell command when loaded",
      "exit 1, one line naming the file; the command never runs (weights-only load); nothing written")  # fmt: skip
def test_malicious_checkpoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"arch": "small_cnn", "embedding_dim": DIM, "image_size": 32, "state_dict": _Shell(marker)},
               tmp_path / "old.pt")  # fmt: skip
    result, work = _legacy(tmp_path, tmp_path / "old.pt")
    out = _refused(result, work, "old.pt")
    assert "Python objects other than tensors" in out
    assert not marker.exists()


@case("model files", "old .pt's weights do not fit the architecture its header names",
      "exit 1, one line naming the file: its state_dict does not fit arch 'small_cnn'; nothing written")  # fmt: skip
def test_checkpoint_weights_do_not_fit(tmp_path: Path) -> None:
    state = build_backbone("small_cnn", 32, 32).state_dict()  # 32-d weights under a 16-d header
    torch.save({"arch": "small_cnn", "embedding_dim": 16, "image_size": 32, "state_dict": state}, tmp_path / "old.pt")
    result, work = _legacy(tmp_path, tmp_path / "old.pt")
    assert "its state_dict does not fit arch 'small_cnn'" in _refused(result, work, "old.pt")


# ------------------------------------------------------------------------------------------------ ONNX files


@case("model files", "old .onnx keeps its weights in a side file (external data, in a subfolder)",
      "exit 0; model and side file copied into legacy/ at the same relative place; its hashes cover both files")  # fmt: skip
def test_onnx_external_data_travels_with_the_model(tmp_path: Path) -> None:
    from components.config import load_config
    from components.stages import upgrade_key

    src = tmp_path / "mine" / "old.onnx"
    w = _onnx(src, location="weights/w.bin")
    result, work = _legacy(tmp_path, src)
    assert result.exit_code == 0, result.output
    legacy = work / "legacy"
    assert (legacy / "model.onnx").is_file() and (legacy / "weights" / "w.bin").is_file()
    copied = load_embedder(legacy / "model.onnx")
    np.testing.assert_allclose(copied(_x()), _x().reshape(5, -1) @ w, rtol=1e-5, atol=1e-6)
    info = json.loads((legacy / "info.json").read_text())
    assert info["model_sha256"] == model_sha256(src) == model_sha256(legacy / "model.onnx")
    cfg = load_config(tmp_path / "params.yaml")
    before = upgrade_key(cfg, "data")
    with open(src.parent / "weights" / "w.bin", "r+b") as f:  # same .onnx, other weights
        f.write(b"\x00\x00\x80\x3f")
    assert model_sha256(src) != info["model_sha256"] and upgrade_key(cfg, "data") != before


@case("model files", "old .onnx's external data location points outside its folder (`../`, absolute path)",
      "exit 1, one line naming the model and the location; nothing read, copied or written")  # fmt: skip
@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_onnx_external_data_outside_the_folder_is_refused(where: str, tmp_path: Path) -> None:
    import onnx

    src = tmp_path / "mine" / "old.onnx"
    _onnx(src, location="w.bin")
    outside = tmp_path / "w.bin"
    shutil.move(src.parent / "w.bin", outside)
    location = "../w.bin" if where == "parent" else str(outside)
    model = onnx.load_model(str(src), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    src.write_bytes(model.SerializeToString())
    result, work = _legacy(tmp_path, src)
    out = _refused(result, work, "old.onnx")
    assert location in out and "outside the model's folder" in out


@case("model files", "old model's suffix lies (.onnx holding a torch checkpoint, .pt holding ONNX)",
      "read by content: exit 0, imported as legacy/model.pt or legacy/model.onnx, same embeddings")  # fmt: skip
@pytest.mark.parametrize("content", ["torch", "onnx"])
def test_model_suffix_that_lies_is_read_by_content(content: str, tmp_path: Path) -> None:
    if content == "torch":
        backbone = build_backbone("small_cnn", DIM, 32).eval()
        src = save_backbone(backbone, tmp_path / "torch.pt", "small_cnn", DIM, 32).rename(tmp_path / "old.onnx")
        x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 32, 32)).astype(np.float32)
        with torch.inference_mode():
            ref = backbone(torch.from_numpy(x)).numpy()
    else:
        w = _onnx(tmp_path / "real.onnx")
        src = (tmp_path / "real.onnx").rename(tmp_path / "old.pt")
        x, ref = _x(), _x().reshape(5, -1) @ w
    result, work = _legacy(tmp_path, src)
    assert result.exit_code == 0, result.output
    name = "model.pt" if content == "torch" else "model.onnx"
    assert json.loads((work / "legacy" / "info.json").read_text())["model"] == name
    np.testing.assert_allclose(load_embedder(work / "legacy" / name)(x), ref, atol=1e-5)


@case("model files", "old .onnx takes float64, float16 or bfloat16 input, or gives non-float32 embeddings",
      "batches are cast to its input type and embeddings back to float32: same results as a float32 model")  # fmt: skip
@pytest.mark.parametrize(("in_type", "out_type", "tol"), [(11, 11, 1e-6), (10, 10, 2e-2), (16, 1, 2e-2), (1, 16, 2e-2)])
def test_onnx_float_types_are_cast(in_type: int, out_type: int, tol: float, tmp_path: Path) -> None:
    w = _onnx(tmp_path / "m.onnx", in_type, out_type)  # 11 double, 10 float16, 16 bfloat16, 1 float
    got = OnnxEmbedder(tmp_path / "m.onnx")(_x())
    assert got.dtype == np.float32 and got.shape == (5, DIM)
    np.testing.assert_allclose(got, _x().reshape(5, -1) @ w, atol=tol * 8, rtol=tol)


@case("model files", "old .onnx takes uint8 or int64 input, or outputs int64",
      "refused before any embedding: one line naming the file, the tensor and its element type")  # fmt: skip
@pytest.mark.parametrize(("in_type", "out_type", "bad"), [(2, 1, "tensor(uint8)"), (7, 1, "tensor(int64)"), (1, 7, "tensor(int64)")])
def test_onnx_non_float_types_are_refused(in_type: int, out_type: int, bad: str, tmp_path: Path) -> None:
    _onnx(tmp_path / "m.onnx", in_type, out_type)
    what = "input 'x'" if in_type != 1 else "output 'y'"
    with pytest.raises(DataError, match=rf"m\.onnx: {what} is {re.escape(bad)}; expected a float type"):
        load_embedder(tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------------------ gallery files


@case("model files", "old gallery is a plain .npy array saved under a .npz name",
      "exit 1, one line naming the file: no paths/ids say which image each row is, rename it to .npy; nothing written")  # fmt: skip
def test_npy_gallery_under_npz_name_is_refused(tmp_path: Path) -> None:
    _onnx(tmp_path / "old.onnx")
    np.save(tmp_path / "g.npy", np.ones((N_GALLERY, DIM), dtype=np.float32))
    gallery = (tmp_path / "g.npy").rename(tmp_path / "gallery.npz")
    result, work = _legacy(tmp_path, tmp_path / "old.onnx", gallery)
    assert "rename it to .npy" in _refused(result, work, "gallery.npz")


@case("model files", "old gallery is an .npz (embeddings + paths) saved under a .npy name",
      "read as .npz by content: exit 0, rows matched by path into gallery-manifest order")  # fmt: skip
def test_npz_gallery_under_npy_name_is_read_by_content(tmp_path: Path) -> None:
    _onnx(tmp_path / "old.onnx")
    emb = np.arange(N_GALLERY * DIM, dtype=np.float32).reshape(N_GALLERY, DIM)
    order = np.arange(N_GALLERY)[::-1]
    with open(tmp_path / "gallery.npy", "wb") as f:
        np.savez(f, embeddings=emb[order], paths=np.array([f"/data/faces/id{i}/0.png" for i in order]))
    result, work = _legacy(tmp_path, tmp_path / "old.onnx", tmp_path / "gallery.npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(work / "legacy" / "gallery.npy"), emb)


# ------------------------------------------------------------------------------------------------ images


@case("images", "a 16-bit grayscale PNG in the ImageFolder",
      "scaled to 8 bits (value / 257, rounded), not saturated to white as PIL's convert would")  # fmt: skip
def test_16bit_grayscale_png(tmp_path: Path) -> None:
    from PIL import Image

    from components.data.imagefolder import load_image

    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(expected.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # PIL kept all 16 bits
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png", 16), expected)


@case("images", "a 16-bit-per-channel (48-bit) RGB PNG in the ImageFolder",
      "read as 8-bit RGB (each channel's high byte), then grayscale: the values a user expects")  # fmt: skip
def test_16bit_rgb_png(tmp_path: Path) -> None:
    from components.data.imagefolder import load_image

    level = np.arange(256, dtype=np.uint16).reshape(16, 16)
    _png16(tmp_path / "rgb48.png", np.stack([level * 257] * 3, axis=-1), color_type=2)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb48.png", 16), level.astype(np.uint8))


@case("images", "an image larger than data.max_pixels (its header claims 5000x5000)",
      "prepare exits 1 naming the file, its size and data.max_pixels, read from the header before decoding; "
      "no dataset written")  # fmt: skip
def test_image_over_the_pixel_budget(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    _faces(root)
    _png_header_only(root / "id3" / "1.png", 5000, 5000)  # no pixel data: decoding it would fail differently
    params = tmp_path / "params.yaml"
    data = {"source": "imagefolder", "root": str(root), "test_identities": 3, "val_identities": 0, "max_pixels": 10_000}
    params.write_text(yaml.safe_dump({"data": data, "legacy": {"batch_size": 4}, "train": {"batch_size": 4}}))
    work = tmp_path / "work"
    result = runner.invoke(app, ["stage", "prepare", "--params", str(params), "--workdir", str(work)])
    assert result.exit_code == 1
    assert "id3/1.png" in result.output and "5000x5000 = 25,000,000 pixels" in result.output
    assert "data.max_pixels = 10,000" in result.output
    assert not (work / "dataset").exists()


@case("images", "an image over PIL's own decompression-bomb limit (20000x20000)",
      "one DataError line with its pixel count and data.max_pixels, not PIL's warning or its bomb error")  # fmt: skip
def test_decompression_bomb_gets_our_message(tmp_path: Path) -> None:
    from components.data.imagefolder import load_image

    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DataError, match=r"bomb\.png: 400,000,000 pixels is more than data\.max_pixels = 16,777,216"):
        load_image(tmp_path / "bomb.png", 32)


@case("images", "prepare on an ImageFolder",
      "each image is decoded once: validation keeps the pixels and the dataset reuses them")  # fmt: skip
def test_prepare_decodes_each_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.config import DataConfig
    from components.data import imagefolder
    from components.paths import Paths
    from components.stages import prepare

    files = _faces(tmp_path / "faces")
    decoded: list[str] = []
    real = imagefolder.load_image
    monkeypatch.setattr(imagefolder, "load_image", lambda p, *a, **k: decoded.append(str(p)) or real(p, *a, **k))
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "faces"), test_identities=3, image_size=20)
    prepare(cfg, Paths(tmp_path / "work"))
    assert sorted(decoded) == sorted(str(f) for f in files)
    import pandas as pd

    manifest = pd.read_csv(tmp_path / "work" / "dataset" / "manifest.csv")
    images = np.load(tmp_path / "work" / "dataset" / "images.npy")
    for row, source in zip(images, manifest["source"], strict=True):
        np.testing.assert_array_equal(row, real(Path(source), 20))


@case("images", "data validation fails inside `mixbct upgrade` (bad input, e.g. a corrupt image)",
      "the prepare task is not retried: an UpgradeError fails the same way twice; other errors keep their retry")  # fmt: skip
def test_bad_input_is_not_retried() -> None:
    from prefect.states import Failed

    from components.errors import ValidationFailed
    from flows.upgrade import retry_unless_bad_input

    assert not retry_unless_bad_input(None, None, Failed(data=ValidationFailed("manifest failed")))
    assert not retry_unless_bad_input(None, None, Failed(data=DataError("x.png: cannot decode image")))
    assert retry_unless_bad_input(None, None, Failed(data=OSError("disk hiccup")))
