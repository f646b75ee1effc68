"""Your data, your old model: an ImageFolder tree, an existing ONNX old model and its gallery file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.data.imagefolder import load_image
from components.embed import export_onnx, extract, load_embedder
from components.io import file_sha256
from components.models import build_backbone
from components.paths import Paths
from components.stages import split_arrays


def _imagefolder(root: Path, identities: int = 30, per: int = 5) -> Path:
    """Identities = random blob patterns; samples = shifted, noisy copies (learnable, not trivial)."""
    rng = np.random.default_rng(0)
    for i in range(identities):
        base = (rng.random((8, 8)) > 0.5).astype(np.float32)
        (root / f"id{i:03d}").mkdir(parents=True)
        for j in range(per):
            img = np.kron(base, np.ones((5, 5)))
            img = np.roll(img, rng.integers(-2, 3, size=2), axis=(0, 1)) + 0.3 * rng.random(img.shape)
            Image.fromarray((255 * img / img.max()).astype(np.uint8)).save(root / f"id{i:03d}" / f"{j}.png")
    return root


@pytest.mark.usefixtures("prefect_harness")
def test_upgrade_on_own_imagefolder_with_existing_onnx_old_model(tmp_path: Path) -> None:
    from flows.upgrade import upgrade

    root = _imagefolder(tmp_path / "faces")
    data = {"source": "imagefolder", "root": str(root), "test_identities": 10, "gallery_per_identity": 2,
            "query_per_identity": 3, "old_fraction": 0.3}  # fmt: skip
    registry = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art")}
    train = {"epochs": 2, "batch_size": 16, "embedding_dim": 16}
    # The user's existing system: an old model (ONNX) and the embeddings it wrote for every image it has seen,
    # keyed by image path, in its own order (here: all images, shuffled): an .npz with `embeddings` + `paths`.
    old = build_backbone("small_cnn", 16, 32).eval()
    export_onnx(old, tmp_path / "old.onnx", 32)
    files = sorted(root.glob("*/*.png"))
    order = np.random.default_rng(1).permutation(len(files))
    images = np.stack([load_image(files[i], 32) for i in order])
    paths = np.array([str(files[i]) if i % 2 else str(files[i].relative_to(root)) for i in order])  # both forms
    np.savez(tmp_path / "gallery.npz", embeddings=extract(load_embedder(tmp_path / "old.onnx"), images), paths=paths)

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data, "train": train, "registry": registry, "legacy": {"embedding_dim": 16},
                                      "old": {"model": str(tmp_path / "old.onnx"), "gallery": str(tmp_path / "gallery.npz")}}))  # fmt: skip
    work = Paths(tmp_path / "work")
    result = upgrade(params=str(params), workdir=str(work.root))
    assert result["status"] == "done"
    info = json.loads((work.legacy / "info.json").read_text())
    assert info["origin"] == "imported" and info["source_model"] == str(tmp_path / "old.onnx")
    assert info["source_gallery_sha256"] == file_sha256(tmp_path / "gallery.npz")
    # the user's rows are used, never re-embedded: picked by path into gallery-manifest order
    gallery_images, _ = split_arrays(work, "gallery")
    expected = extract(load_embedder(tmp_path / "old.onnx"), gallery_images)
    np.testing.assert_allclose(np.load(work.legacy / "gallery.npy"), expected, rtol=0, atol=1e-5)
    assert info["gallery_rows_unused"] == len(files) - len(gallery_images) > 0
    assert not (work.legacy / "history.json").exists()  # no old model was trained
    metrics = json.loads((work.eval / "metrics.json").read_text())
    assert {"old/old", "new/old", "new/new"} <= set(metrics["pairs"])
    assert result["register"]["registered"] == metrics["criterion"]["passed"]
