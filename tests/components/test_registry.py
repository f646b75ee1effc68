"""Conditional registration against a real MLflow sqlite store.

The evaluation is real (faiss metrics and the criterion on synthetic embeddings, one compatible and one not);
the model is a real ONNX export. Only training is skipped, to keep this test fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from components.config import load_config
from components.embed import export_onnx, save_backbone
from components.evaluate import compatibility_table, criterion
from components.io import write_json
from components.models import build_backbone
from components.paths import Paths
from components.registry import track_and_register


def _work(tmp_path: Path, compatible: bool) -> tuple[Paths, dict]:
    paths = Paths(tmp_path / "work")
    rng = np.random.default_rng(0)
    n_id, d = 50, 16
    centres = rng.standard_normal((n_id, d))
    yq, yb = np.repeat(np.arange(n_id), 2), np.arange(n_id)
    old = (centres[yq] + 0.9 * rng.standard_normal((len(yq), d)), centres[yb] + 0.9 * rng.standard_normal((n_id, d)))
    if compatible:  # less noisy features in the old space
        new = (centres[yq] + 0.3 * rng.standard_normal((len(yq), d)), centres[yb] + 0.3 * rng.standard_normal((n_id, d)))
    else:  # a rotated space: good alone, useless against the old gallery
        rot = np.linalg.qr(rng.standard_normal((d, d)))[0]
        new = ((centres[yq] + 0.3 * rng.standard_normal((len(yq), d))) @ rot, (centres[yb] + 0.3 * rng.standard_normal((n_id, d))) @ rot)
    table = compatibility_table({"old": old, "new": new}, yq, yb, [("old", "old"), ("new", "old"), ("new", "new")])
    verdict = criterion(table, paragon=None)
    assert verdict.passed == compatible
    paths.eval.mkdir(parents=True)
    write_json(paths.eval / "metrics.json", {"pairs": table.to_dict(), "criterion": verdict.to_dict()})
    (paths.eval / "table.md").write_text(table.markdown(verdict))
    # the pieces registration reads: a real model + ONNX export, the legacy info, gallery images for parity
    model = build_backbone("small_cnn", d, 32).eval()
    paths.model_dir("new").mkdir(parents=True)
    save_backbone(model, paths.model_dir("new") / "model.pt", "small_cnn", d, 32)
    export_onnx(model, paths.model_dir("new") / "model.onnx", 32)
    paths.legacy.mkdir(parents=True)
    write_json(paths.legacy / "info.json", {"model": "model.onnx", "model_sha256": "a" * 64, "gallery_sha256": "b" * 64})
    paths.dataset.mkdir(parents=True)
    np.save(paths.images, rng.integers(0, 255, (8, 32, 32), dtype=np.uint8))
    (paths.manifest).write_text("id,source,sample,identity,split,label\n" + "".join(
        f"g{i},s{i},0,i{i},gallery,{i}\n" for i in range(8)))  # fmt: skip
    return paths, {"params": "p", "data": "d", "old_model": "a" * 64, "gallery": "b" * 64}


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(tmp_path / "none.yaml", {
        "train.embedding_dim": 16, "legacy.embedding_dim": 16,
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.artifact_root": str(tmp_path / "mlartifacts"),
    })  # fmt: skip


def test_compatible_model_becomes_challenger(cfg, tmp_path: Path) -> None:
    paths, fingerprint = _work(tmp_path, compatible=True)
    result = track_and_register(cfg, paths, fingerprint)
    assert result["registered"] and result["version"] == 1
    client = MlflowClient()
    version = client.get_model_version_by_alias("kanji-embedder", "challenger")
    assert str(version.version) == "1"
    assert version.tags["gallery_sha256"] == "b" * 64 and version.tags["gate.passed"] == "True"
    assert "compatible with old model" in version.description
    run = client.get_run(result["run_id"])
    assert run.data.tags["registration"] == "kanji-embedder/1"
    assert run.data.metrics["onnx.max_abs_diff"] < 1e-4
    pyfunc = mlflow.pyfunc.load_model("models:/kanji-embedder@challenger")
    out = pyfunc.predict(np.zeros((3, 1, 32, 32), dtype=np.float32))
    assert np.asarray(list(out.values())[0] if isinstance(out, dict) else out).shape == (3, 16)
    assert json.loads(Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="compatibility/metrics.json")).read_text())["criterion"]["passed"]


def test_incompatible_model_is_not_registered(cfg, tmp_path: Path) -> None:
    paths, fingerprint = _work(tmp_path, compatible=False)
    result = track_and_register(cfg, paths, fingerprint)
    assert not result["registered"]
    client = MlflowClient()
    assert client.search_model_versions("name='kanji-embedder'") == []
    run = client.get_run(result["run_id"])
    assert run.data.tags["registration"] == "refused"
    assert "new/old" in run.data.tags["registration.reason"]


def test_promote_and_rollback(cfg, tmp_path: Path) -> None:
    from components.errors import UpgradeError
    from components.registry import promote, rollback

    paths, fingerprint = _work(tmp_path, compatible=True)
    track_and_register(cfg, paths, fingerprint)  # version 1
    track_and_register(cfg, paths, fingerprint)  # version 2, now @challenger
    with pytest.raises(UpgradeError, match="no @champion"):
        rollback(cfg.registry)
    assert promote(cfg.registry, "1")["champion"] == 1
    with pytest.raises(UpgradeError, match="first @champion"):
        rollback(cfg.registry)
    out = promote(cfg.registry)  # the challenger
    assert out == {"model_name": "kanji-embedder", "champion": 2, "previous": 1}
    assert rollback(cfg.registry)["champion"] == 1
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("kanji-embedder", "champion").version) == "1"
    with pytest.raises(UpgradeError, match="no version 9"):
        promote(cfg.registry, "9")

    # a version registered by hand, whose gate failed, or checked against another gallery: refused
    run = client.get_run(client.get_model_version("kanji-embedder", "1").tags["run_id"])
    uri = f"runs:/{run.info.run_id}/model"
    failed = mlflow.register_model(uri, "kanji-embedder", tags={"gate.passed": "False", "gallery_sha256": "b" * 64})
    with pytest.raises(UpgradeError, match="did not pass"):
        promote(cfg.registry, str(failed.version))
    other = mlflow.register_model(uri, "kanji-embedder", tags={"gate.passed": "True", "gallery_sha256": "c" * 64})
    with pytest.raises(UpgradeError, match="gallery"):
        promote(cfg.registry, str(other.version))
    assert str(client.get_model_version_by_alias("kanji-embedder", "champion").version) == "1"


def test_registered_inputs_are_found_by_their_key(cfg, tmp_path: Path) -> None:
    from components.registry import find_registered

    paths, fingerprint = _work(tmp_path, compatible=True)
    assert find_registered(cfg.registry, "k1") is None  # no registered model at all yet
    track_and_register(cfg, paths, {**fingerprint, "upgrade_key": "k1"})
    found = find_registered(cfg.registry, "k1")
    assert found is not None and found["version"] == 1
    assert find_registered(cfg.registry, "k2") is None
