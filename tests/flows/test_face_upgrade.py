"""A face-shaped upgrade end to end on CPU: 112x112 RGB images in an insightface RecordIO, an IResNet-18 old model
and an IResNet-50 new model (the paper's pair), a `.bin` verification set and an IJB-C-style protocol scored for
every model pair, the decision registered (or refused) in MLflow with the preprocess inside the ONNX.

The 'faces' are colourised KanjiVG glyphs (tests/face_kit.py) and the models train for two epochs: the test checks
that every format and shape flows through every stage, not what the numbers are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from components.paths import Paths
from components.preprocess import METADATA_KEY, Preprocess
from tests.face_kit import faces, glyph_files, write_ijb, write_recordio_set, write_verification_bin

SIZE = 112


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_face_upgrade_recordio_iresnet18_to_iresnet50(tmp_path: Path, kanjivg_raw: Path) -> None:
    from mlflow import MlflowClient

    from flows.upgrade import upgrade

    files = glyph_files(kanjivg_raw, 44)
    train = {k: faces(f, k, 8, SIZE) for k, f in enumerate(files[:36])}  # identities of the RecordIO set
    held = {k: faces(f, k, 8, SIZE, first=20) for k, f in enumerate(files[36:], start=36)}  # never in it
    rec = write_recordio_set(tmp_path / "ms1m-like", train)
    bin_path = write_verification_bin(tmp_path / "verify.bin", held, pairs=40)
    ijb_root, crops = write_ijb(tmp_path / "IJBC", held)

    params = {
        "runtime": {"threads": 2, "workers": 2},
        "data": {"source": "recordio", "root": str(rec.parent), "image_size": SIZE, "channels": 3,
                 "test_identities": 8, "val_identities": 2, "gallery_per_identity": 2, "query_per_identity": 3},
        "legacy": {"arch": "iresnet18", "embedding_dim": 64, "epochs": 2, "batch_size": 16, "lr": 0.05},
        "train": {"arch": "iresnet50", "embedding_dim": 64, "epochs": 2, "batch_size": 16, "lr": 0.05, "hflip": True,
                  "paragon": False, "method_args": {"mixbct": {"alpha": 0.5}}},
        "evaluate": {"bootstrap_resamples": 100, "verification": [str(bin_path)],
                     "ijb": {"root": str(ijb_root), "images": str(crops)}},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_root": str(tmp_path / "art"),
                     "model_name": "face-embedder"},
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    work = Paths(tmp_path / "work")
    result = upgrade(params=str(tmp_path / "params.yaml"), workdir=str(work.root))
    assert result["status"] == "done"

    # Streamed: nothing stored but the manifest, every read decoded from the RecordIO.
    summary = json.loads((work.dataset / "summary.json").read_text())
    assert summary["store"]["kind"] == "source" and not work.images.exists()
    # Both models take 112x112 RGB and say so in their ONNX metadata.
    for model in (work.legacy / "model.onnx", work.model_dir("new") / "model.onnx"):
        props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
        pre = Preprocess.from_json(props[METADATA_KEY])
        assert pre.size == (SIZE, SIZE) and pre.channels == 3
        assert onnx.load(str(model)).graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3
    info = json.loads((work.model_dir("new") / "info.json").read_text())
    assert info["onnx_parity"] < 1e-4
    gallery = np.load(work.legacy / "gallery.npy")
    assert gallery.shape == (8 * 2, 64) and np.isfinite(gallery).all()

    metrics = json.loads((work.eval / "metrics.json").read_text())
    face = metrics["face"]
    assert set(face) == {"verify", "ijbc"}
    for name in face:
        assert set(face[name]["pairs"]) == {"old/old", "new/old", "new/new"}
    for pair in face["verify"]["pairs"].values():
        assert 0.0 <= pair["accuracy"] <= 1.0 and pair["pairs"] == 40
    for pair in face["ijbc"]["pairs"].values():
        assert 0.0 <= pair["rank1"] <= 1.0 and pair["genuine_pairs"] > 0
    table = (work.eval / "table.md").read_text()
    assert "## verify: insightface verification pairs" in table and "## ijbc: IJB-C-style templates" in table

    # The decision is recorded either way; the face sets are logged with the run.
    client = MlflowClient(params["registry"]["tracking_uri"])
    run = client.get_run(result["register"]["run_id"])
    assert any(k.startswith("face.verify.new/old.accuracy") for k in run.data.metrics)
    assert any(k.startswith("face.ijbc.new/old.rank1") for k in run.data.metrics)
    assert result["register"]["registered"] == metrics["criterion"]["passed"]
