"""Registration is all-or-nothing for the registry's readers, under a real SIGKILL at every MLflow call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cases import case

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _kill_sweep(tmp_path: Path, registry_inputs, first: str) -> list[dict]:
    paths, _ = registry_inputs(tmp_path / "work", compatible=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "kills.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "kill_registration.py"), str(paths.root), uri, str(tmp_path / "mlartifacts"), first, str(out)],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _cfg(tmp_path: Path):
    from components.config import load_config

    return load_config(None, {
        "train.embedding_dim": 16, "legacy.embedding_dim": 16,
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registry.artifact_root": str(tmp_path / "mlartifacts"),
    })  # fmt: skip


def _check_sweep(results: list[dict], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from components import registry

    killed = [r for r in results if r["killed"]]
    assert killed and all(r["killed"] for r in results[:-1]), [r for r in results if not r["killed"]]
    assert results[-1]["exit"] == 0, "the registration after the sweep did not complete"
    drift = [r for r in results[:-1] if r["killed_call"] != r["call"]]
    assert not drift, f"the children did not make the dry run's calls: {drift}"
    bad = [r for r in results if not r["readers_ok"]]
    assert not bad, f"a reader saw an incomplete version as usable after these kills: {bad}"
    bad = [r for r in results if not r["recovered_ok"]]
    assert not bad, f"recovery left an incomplete version or a RUNNING run after these kills: {bad}"
    cfg = _cfg(tmp_path)
    out = registry.doctor(cfg.registry)
    assert out["incomplete_versions"] == [] and out["deleted_versions"] == [] and out["failed_runs"] == []
    client = MlflowClient()
    running = client.search_runs([registry._experiment(cfg.registry).experiment_id], "attributes.status = 'RUNNING'")
    assert running == [], [r.info.run_id for r in running]
    for v in registry._all_versions(client, cfg.registry.model_name):
        assert registry.is_complete(v) and v.tags["gallery_sha256"] == "b" * 64 and v.tags["upgrade_key"]
    challenger = client.get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert registry.is_complete(challenger)
    assert registry.promote(cfg.registry)["champion"] == int(challenger.version)


@case("registration", "registration killed (SIGKILL) right after each MLflow call from the version's creation on",
      "no incomplete version is ever promotable or seen as 'nothing to upgrade'; the next run deletes it and "
      "marks the killed run FAILED")
def test_kill_at_every_registry_call(tmp_path: Path, registry_inputs) -> None:
    results = _kill_sweep(tmp_path, registry_inputs, first="create_registered_model")
    calls = [r["call"] for r in results if r["killed"]]
    for name in ("_create_model_version", "update_model_version", "set_registered_model_alias", "set_model_version_tag"):
        assert name in calls, (name, calls)
    _check_sweep(results, tmp_path)


@pytest.mark.slow
@case("registration", "the upgrade's MLflow logging killed (SIGKILL) after every one of its calls, from the first",
      "each killed run is marked FAILED by the next registration; no version without all its tags exists at the end")
def test_kill_at_every_mlflow_call(tmp_path: Path, registry_inputs) -> None:
    results = _kill_sweep(tmp_path, registry_inputs, first="1")
    assert len(results) > 30
    _check_sweep(results, tmp_path)
