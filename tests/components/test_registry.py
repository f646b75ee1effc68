"""Conditional registration against a real MLflow sqlite store.

The evaluation is real (faiss metrics and the criterion on synthetic embeddings, one compatible and one not);
the model is a real ONNX export. Only training is skipped, to keep this test fast (`registry_inputs`, conftest).
`stages.register` measures the ONNX parity, `gate.decide` decides, `registry.track_and_register` records.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from components.config import load_config
from components.stages import register


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(None, {
        "train.embedding_dim": 16, "legacy.embedding_dim": 16,
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.artifact_root": str(tmp_path / "mlartifacts"),
    })  # fmt: skip


def test_compatible_model_becomes_challenger(cfg, registry_inputs, tmp_path: Path) -> None:
    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    result = register(cfg, paths, fingerprint)
    assert result["registered"] and result["version"] == 1
    client = MlflowClient()
    version = client.get_model_version_by_alias("kanji-embedder", "challenger")
    assert str(version.version) == "1"
    assert version.tags["gallery_sha256"] == "b" * 64 and version.tags["gate.passed"] == "True"
    assert json.loads(version.tags["preprocess"])["channels"] == 1  # how to feed it, read from the ONNX's metadata
    assert "compatible with old model" in version.description
    run = client.get_run(result["run_id"])
    assert run.data.tags["registration"] == "kanji-embedder/1"
    assert run.data.metrics["onnx.max_abs_diff"] < 1e-4
    pyfunc = mlflow.pyfunc.load_model("models:/kanji-embedder@challenger")
    out = pyfunc.predict(np.zeros((3, 1, 32, 32), dtype=np.float32))
    assert np.asarray(list(out.values())[0] if isinstance(out, dict) else out).shape == (3, 16)
    assert json.loads(Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="compatibility/metrics.json")).read_text())["criterion"]["passed"]


def test_registered_version_carries_intervals_flips_and_the_backfill_curve(cfg, registry_inputs, tmp_path: Path) -> None:
    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    metrics = json.loads((paths.eval / "metrics.json").read_text())
    result = register(cfg, paths, fingerprint)
    assert result["registered"]
    client = MlflowClient()
    version = client.get_model_version("kanji-embedder", "1")
    lo = metrics["criterion"]["intervals"]["cross"]["top1"][1]
    assert metrics["criterion"]["require"] == "interval" and lo > 0  # the default gate: the interval's lower bound
    assert version.tags["gate.rule"] == "interval"
    assert version.tags["ci.cross.top1"].endswith("points") and f"{100 * lo:+.2f}" in version.tags["ci.cross.top1"]
    flip = metrics["bootstrap"]["negative_flips"]["old/old -> new/old"]["nf_share"]["point"]
    assert version.tags["flips.old/old -_ new/old"].startswith(f"{flip:.4f}")
    auc = metrics["backfill"]["random"]["auc"]["top1"]
    assert version.tags["backfill.random.auc.top1"] == f"{auc:.4f}"
    run = client.get_run(result["run_id"])
    assert run.data.metrics["backfill.random.auc.top1"] == pytest.approx(auc)
    assert run.data.metrics["ci.new/old - old/old.top1.lo"] == pytest.approx(lo)
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "compatibility")}
    assert "compatibility/backfill.png" in artifacts
    png = Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="compatibility/backfill.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_incompatible_model_is_not_registered(cfg, registry_inputs, tmp_path: Path) -> None:
    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=False)
    result = register(cfg, paths, fingerprint)
    assert not result["registered"]
    client = MlflowClient()
    assert client.search_model_versions("name='kanji-embedder'") == []
    run = client.get_run(result["run_id"])
    assert run.data.tags["registration"] == "refused"
    assert "new/old" in run.data.tags["registration.reason"]
    assert run.data.tags["gate.passed"] == "False" and run.data.tags["gate.onnx_ok"] == "True"


def test_onnx_parity_above_tolerance_is_refused(cfg, registry_inputs, tmp_path: Path, monkeypatch) -> None:
    """A compatible model whose ONNX export disagrees with torch: the run says why, nothing is registered, and the
    caller gets an UpgradeError (non-zero exit from `mixbct stage register`)."""
    import components.embed
    from components.errors import UpgradeError

    monkeypatch.setattr(components.embed, "onnx_parity", lambda *a, **k: 3e-3)
    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    with pytest.raises(UpgradeError, match=r"ONNX parity 3.00e-03 > 0.0001"):
        register(cfg, paths, fingerprint)
    client = MlflowClient()
    assert client.search_model_versions("name='kanji-embedder'") == []
    (run,) = client.search_runs([client.get_experiment_by_name("mixbct-upgrade").experiment_id])
    assert run.data.tags["registration"] == "refused" and run.data.tags["gate.passed"] == "True"
    assert "ONNX parity 3.00e-03 > 0.0001" in run.data.tags["registration.reason"]
    assert run.data.metrics["onnx.max_abs_diff"] == pytest.approx(3e-3)


def test_promote_and_rollback(cfg, registry_inputs, tmp_path: Path) -> None:
    from components.errors import UpgradeError
    from components.registry import promote, rollback

    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    register(cfg, paths, fingerprint)  # version 1
    register(cfg, paths, fingerprint)  # version 2, now @challenger
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
    done = {"registration": "complete"}
    failed = mlflow.register_model(uri, "kanji-embedder", tags={"gate.passed": "False", "gallery_sha256": "b" * 64, **done})
    with pytest.raises(UpgradeError, match="did not pass"):
        promote(cfg.registry, str(failed.version))
    other = mlflow.register_model(uri, "kanji-embedder", tags={"gate.passed": "True", "gallery_sha256": "c" * 64, **done})
    with pytest.raises(UpgradeError, match="gallery"):
        promote(cfg.registry, str(other.version))
    unfinished = mlflow.register_model(uri, "kanji-embedder", tags={"gate.passed": "True", "gallery_sha256": "b" * 64})
    with pytest.raises(UpgradeError, match=f"version {unfinished.version} is incomplete"):
        promote(cfg.registry, str(unfinished.version))
    assert str(client.get_model_version_by_alias("kanji-embedder", "champion").version) == "1"


def test_registered_inputs_are_found_by_their_key(cfg, registry_inputs, tmp_path: Path) -> None:
    from components.registry import find_registered

    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    assert find_registered(cfg.registry, "k1") is None  # no registered model at all yet
    register(cfg, paths, {**fingerprint, "upgrade_key": "k1"})
    found = find_registered(cfg.registry, "k1")
    assert found is not None and found["version"] == 1
    assert find_registered(cfg.registry, "k2") is None
