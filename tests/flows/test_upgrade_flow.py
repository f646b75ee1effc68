"""A tiny end-to-end run of the real Prefect flow, with a real MLflow store, and what it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.upgrade import upgrade


@pytest.mark.usefixtures("prefect_harness")
def test_tiny_upgrade_flow_tracks_and_gates(params_factory, tmp_path: Path) -> None:
    params = params_factory()
    result = upgrade(params=str(params), workdir=str(tmp_path / "work"))
    work = tmp_path / "work"
    for out in ("dataset/manifest.csv", "legacy/model.onnx", "legacy/gallery.npy", "old_features/credible.npy",
                "new/model.onnx", "paragon/model.onnx", "eval/metrics.json", "reports/data_validation.md",
                "reports/legacy_gallery_validation.md", "reports/new_gallery_validation.md"):  # fmt: skip
        assert (work / out).is_file(), out
    metrics = json.loads((work / "eval/metrics.json").read_text())
    from prefect.artifacts import Artifact

    table = Artifact.get("compatibility-table")
    assert table is not None and "new/old" in table.data
    assert Artifact.get("gate-verdict") is not None and Artifact.get("mlflow-run") is not None
    assert {"old/old", "new/old", "new/new", "paragon/old", "paragon/paragon"} <= set(metrics["pairs"])

    # The gate refuses the paragon (ArcFace alone): its queries cannot search the old gallery.
    from components.evaluate import CompatibilityTable, criterion

    paragon_gate = criterion(CompatibilityTable.from_dict(metrics["pairs"]), new="paragon", paragon=None)
    assert not paragon_gate.passed
    assert any("paragon/old" in r for r in paragon_gate.reasons)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(result["register"]["run_id"])
    assert run.data.params["train.method"] == "mixbct"
    assert len(client.get_metric_history(run.info.run_id, "train.new.loss")) == 2  # one point per epoch
    assert run.data.tags["gate.passed"] == str(metrics["criterion"]["passed"])
    versions = client.search_model_versions("name='kanji-embedder'")
    if metrics["criterion"]["passed"]:
        assert [str(v.version) for v in versions] == ["1"]
        assert str(client.get_model_version_by_alias("kanji-embedder", "challenger").version) == "1"
        again = upgrade(params=str(params), workdir=str(tmp_path / "work2"))  # same inputs: no work at all
        assert again["status"] == "nothing-to-upgrade" and again["existing"]["version"] == 1
        assert not (tmp_path / "work2").exists()
    else:  # the gate refused: nothing registered, and the run says why
        assert versions == []
        assert run.data.tags["registration"] == "refused"
        assert "<=" in run.data.tags["registration.reason"]
