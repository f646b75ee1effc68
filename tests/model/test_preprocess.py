"""Preprocessing is declared per model: the default is the old [-1, 1] scaling bit for bit; RGB, sizes, order,
mean/std and layout are applied as declared; every export carries its preprocess; an ONNX old model is fed from
params, else its metadata, else data.*, and a declared input that disagrees is refused naming the field."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from components.config import load_config
from components.data.store import ArrayWriter, ImageRows, batches, chunks
from components.embed import OnnxEmbedder, export_onnx, load_backbone, load_embedder, onnx_parity, save_backbone
from components.errors import ConfigError, DataError
from components.models import build_backbone
from components.preprocess import METADATA_KEY, Preprocess, default_preprocess, to_input

RNG = np.random.default_rng(0)


def test_default_is_the_old_scaling_bit_for_bit() -> None:
    images = RNG.integers(0, 256, size=(9, 32, 32), dtype=np.uint8)
    got, want = default_preprocess(32).tensor(images), to_input(torch.from_numpy(images))
    assert torch.equal(got, want)
    assert got.stride() == want.stride()  # else convolutions take the channels-last path: other float sums
    assert Preprocess(size=32, channels=3).tensor(np.repeat(images[..., None], 3, 3)).is_contiguous()


def test_rgb_size_order_mean_std_and_layout() -> None:
    gray = RGB = RNG.integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    x = Preprocess(size=8, channels=3).array(gray)  # gray stored, RGB model: the plane repeats
    assert x.shape == (2, 3, 8, 8) and np.array_equal(x[:, 0], x[:, 2])
    RGB = RNG.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    pre = Preprocess(size=(8, 8), channels=3, order="bgr", mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
    x = pre.array(RGB)
    for c, (m, s) in enumerate(zip(pre.mean, pre.std, strict=True)):
        np.testing.assert_allclose(x[:, c], RGB[..., 2 - c] / s - m / s, rtol=1e-6)  # BGR: channel 0 is blue
    nhwc = Preprocess(size=8, channels=3, layout="nhwc").array(RGB)
    assert nhwc.shape == (2, 8, 8, 3)
    resized = Preprocess(size=(4, 6), channels=1).array(RGB)  # RGB -> luma, 8x8 -> 4x6
    assert resized.shape == (2, 1, 4, 6) and resized.min() >= -1 and resized.max() <= 1


def test_params_refuse_a_preprocess_that_does_not_add_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.preprocess.*mean"):
        load_config(None, {"train.preprocess": {"size": 32, "channels": 3, "mean": [1.0, 2.0]}})
    with pytest.raises(ConfigError, match=r"legacy\.preprocess.*std"):
        load_config(None, {"legacy.preprocess": {"size": 32, "std": [0]}})


def _rgb_model() -> tuple[nn.Module, Preprocess]:
    torch.manual_seed(0)
    pre = Preprocess(size=32, channels=3, mean=(120.0, 110.0, 100.0), std=(60.0, 61.0, 62.0))
    model = build_backbone("resnet_small", 12, 32, in_channels=3)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # non-trivial BatchNorm statistics
    return model.eval(), pre


def test_an_rgb_export_carries_its_preprocess_and_agrees_with_torch(tmp_path: Path) -> None:
    model, pre = _rgb_model()
    export_onnx(model, tmp_path / "m.onnx", pre)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert Preprocess.from_json(props[METADATA_KEY]) == pre
    emb = OnnxEmbedder(tmp_path / "m.onnx")
    assert emb.preprocess == pre and emb.dim == 12 and emb.image_size == 32
    stored = RNG.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    assert onnx_parity(model, tmp_path / "m.onnx", stored) < 1e-4
    save_backbone(model, tmp_path / "m.pt", "resnet_small", 12, 32, pre)  # checkpoint: rebuilt with 3 channels
    again, meta = load_backbone(tmp_path / "m.pt")
    torch_emb = load_embedder(tmp_path / "m.pt")
    assert torch_emb.preprocess == pre
    x = pre.array(stored)
    np.testing.assert_allclose(torch_emb(x), emb(x), atol=1e-4)


def test_an_onnx_input_that_disagrees_with_params_is_refused(tmp_path: Path) -> None:
    model, pre = _rgb_model()
    export_onnx(model, tmp_path / "m.onnx", pre)
    with pytest.raises(DataError, match=r"m\.onnx.*3 channel.*old\.preprocess says channels = 1"):
        OnnxEmbedder(tmp_path / "m.onnx", preprocess=Preprocess(size=32, channels=1))
    with pytest.raises(DataError, match=r"m\.onnx.*height is 32.*size = \[48, 48\]"):
        OnnxEmbedder(tmp_path / "m.onnx", preprocess=Preprocess(size=48, channels=3))


class _Sequence(nn.Module):
    """A recogniser-shaped model: features [n, T, d] from a conv trunk, then per-step class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x).mean(dim=2).transpose(1, 2)  # [n, W, 6]
        return self.head(f).softmax(-1)  # [n, W, 11]


def test_a_named_tensor_pooled_is_the_embedding(tmp_path: Path) -> None:
    """A third-party model without metadata: fed from params, its embedding read from an inner tensor."""
    torch.manual_seed(1)
    model = _Sequence().eval()
    torch.onnx.export(model, (torch.zeros(2, 3, 8, 16),), str(tmp_path / "rec.onnx"), input_names=["x"],
                      output_names=["probs"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True)  # fmt: skip
    graph = onnx.load(str(tmp_path / "rec.onnx")).graph
    transpose = next(n.output[0] for n in graph.node if n.op_type == "Transpose")  # the [n, W, 6] features
    pre = Preprocess(size=(8, 16), channels=3)
    with pytest.raises(DataError, match="expected output \\[n, d\\].*old.output"):
        OnnxEmbedder(tmp_path / "rec.onnx", preprocess=pre)
    emb = OnnxEmbedder(tmp_path / "rec.onnx", preprocess=pre, output=transpose, pool="mean_seq")
    stored = RNG.integers(0, 256, size=(3, 8, 16, 3), dtype=np.uint8)
    with torch.inference_mode():
        want = model.conv(pre.tensor(stored)).mean(dim=2).transpose(1, 2).mean(dim=1).numpy()
    assert emb.dim == 6
    np.testing.assert_allclose(emb(pre.array(stored)), want, atol=1e-5)
    with pytest.raises(DataError, match="old.output 'nope' is not a tensor of the graph"):
        OnnxEmbedder(tmp_path / "rec.onnx", preprocess=pre, output="nope", pool="mean")


def test_image_rows_read_exactly_what_the_array_holds(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, size=(50, 6, 5, 3), dtype=np.uint8)
    with ArrayWriter(tmp_path / "images.npy", images.shape) as writer:
        for block in np.array_split(RNG.permutation(50), 7):  # rows written in any order
            writer.write(block, images[block])
    assert np.array_equal(np.load(tmp_path / "images.npy"), images)
    rows = np.array([3, 4, 5, 40, 2, 2, 49])
    view = ImageRows(tmp_path / "images.npy").subset(rows)
    assert view.shape == (7, 6, 5, 3)
    assert np.array_equal(view[np.array([6, 0, 1, 4])], images[rows[[6, 0, 1, 4]]])
    assert np.array_equal(view[1:4], images[rows[1:4]]) and np.array_equal(view[3], images[40])
    assert np.array_equal(pickle.loads(pickle.dumps(view))[:], images[rows])  # as a DataLoader worker gets it
    pre = Preprocess(channels=3)
    order = [np.array([0, 6, 2]), np.array([5, 1]), np.array([3, 4])]
    serial = [x.numpy() for x in batches(view, pre, order, workers=0)]
    parallel = [x.numpy() for x in batches(view, pre, order, workers=2)]
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert [len(c) for c in chunks(7, 3)] == [3, 3, 1]


def test_a_truncated_store_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", np.zeros((10, 4, 4), dtype=np.uint8))
    data = (tmp_path / "images.npy").read_bytes()
    (tmp_path / "images.npy").write_bytes(data[:-5])
    with pytest.raises(DataError, match="truncated"):
        ImageRows(tmp_path / "images.npy")


def test_features_written_by_blocks_are_the_bytes_np_save_writes(tmp_path: Path) -> None:
    """extract_to_file streams an embedder's output to disk; the file is np.save's, so hashes and DVC see no change."""
    from components.data.store import ArrayRows
    from components.embed import extract, extract_to_file

    class Twice:  # an embedder: 2 x the mean pixel per channel, 3-d
        dim, source = 3, "twice"
        preprocess = Preprocess(channels=3)

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return 2 * x.mean(axis=(2, 3))

    images = RNG.integers(0, 256, size=(37, 4, 4, 3), dtype=np.uint8)
    want = extract(Twice(), images, batch_size=8)
    assert extract_to_file(Twice(), images, tmp_path / "f.npy", batch_size=8)
    np.save(tmp_path / "ref.npy", want)
    assert (tmp_path / "f.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    rows = ArrayRows(tmp_path / "f.npy")
    assert rows.dtype == np.float32 and rows.shape == (37, 3)
    assert np.array_equal(rows[np.array([36, 0, 5, 6, 7])], want[[36, 0, 5, 6, 7]])
    with ArrayWriter(tmp_path / "g.npy", (4, 3), np.float32) as writer:
        with pytest.raises(ValueError, match="do not fit"):
            writer.write_block(0, np.zeros((2, 2)))
        with pytest.raises(ValueError, match="outside"):
            writer.write_block(3, np.zeros((2, 3)))
