"""ONNX export agrees with torch, for a dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.embed import OnnxEmbedder, export_onnx, load_embedder, onnx_parity, save_backbone
from components.models import available_archs, build_backbone


# The IResNets are checked at their smallest depth (18): the deeper ones differ in block counts only, and cost
# minutes on 2 cores (tests/model/test_iresnet.py checks their structure against insightface's).
ARCHS = [a for a in available_archs() if not a.startswith("iresnet")] + ["iresnet18"]


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_matches_torch(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone(arch, 24, 32)
    # non-trivial BatchNorm statistics, as after training
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 32, 32))
    model.eval()
    export_onnx(model, tmp_path / "m.onnx", 32)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "weights must live inside the one file"
    images = np.random.default_rng(0).integers(0, 256, size=(7, 32, 32), dtype=np.uint8)  # odd batch: dynamic
    assert onnx_parity(model, tmp_path / "m.onnx", images) < 1e-5  # on normalised embeddings, whatever their scale
    emb = OnnxEmbedder(tmp_path / "m.onnx")
    assert (emb.dim, emb.image_size) == (24, 32)


def test_torch_and_onnx_embedders_agree(tmp_path: Path) -> None:
    model = build_backbone("small_cnn", 16, 32).eval()
    save_backbone(model, tmp_path / "m.pt", "small_cnn", 16, 32)
    export_onnx(model, tmp_path / "m.onnx", 32)
    x = np.random.default_rng(1).uniform(-1, 1, size=(5, 1, 32, 32)).astype(np.float32)
    a, b = load_embedder(tmp_path / "m.pt")(x), load_embedder(tmp_path / "m.onnx")(x)
    assert a.shape == b.shape == (5, 16)
    assert np.max(np.abs(a - b)) < 1e-4
