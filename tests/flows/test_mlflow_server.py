"""Registration, promotion and rollback through a real `mlflow server` over HTTP, and a registry that is down.

The server keeps its metadata in sqlite and serves artifacts itself (`--artifacts-destination`); the project
writes them through it with `registry.artifact_root: mlflow-artifacts:/mixbct`, as a client on another machine
would. Inputs to registration are real evaluations of synthetic embeddings with a real ONNX model
(`registry_inputs`, conftest); nothing is trained.
"""

from __future__ import annotations

import time
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from project_copy import background, free_port, tool_env, wait_http

from components.config import Config, load_config
from components.errors import UpgradeError
from components.registry import find_registered, promote, rollback
from components.stages import register

MODEL = "kanji-embedder"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A tracking server on 127.0.0.1 and a free port; yields its URL and its artifact folder."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port, artifacts, log = free_port(), tmp / "artifacts", tmp / "server.log"
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", artifacts.as_uri()]  # fmt: skip
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # None: MLflow's default
    with background(cmd, tmp, tool_env(tmp), log) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, log, timeout=120)
        yield url, artifacts
    mlflow.set_tracking_uri(previous)  # connect() set the process-wide URI (and MLFLOW_TRACKING_URI) to this server


@pytest.fixture(autouse=True)
def _bounded_http(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's default is 7 retries with exponential backoff: minutes before an unreachable server is reported.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def _cfg(tmp_path: Path, tracking_uri: str) -> Config:
    return load_config(None, {
        "train.embedding_dim": 16, "legacy.embedding_dim": 16,
        "registry.tracking_uri": tracking_uri, "registry.artifact_root": "mlflow-artifacts:/mixbct",
    })  # fmt: skip


@pytest.mark.slow
def test_register_promote_rollback_over_http(server, registry_inputs, tmp_path: Path) -> None:
    url, artifacts = server
    cfg = _cfg(tmp_path, url)
    client = MlflowClient(tracking_uri=url, registry_uri=url)

    refused = register(cfg, *registry_inputs(tmp_path / "incompatible", compatible=False))
    assert not refused["registered"] and "new/old" in refused["reason"]
    assert client.search_model_versions(f"name='{MODEL}'") == []
    assert client.get_run(refused["run_id"]).data.tags["registration"] == "refused"

    paths, fingerprint = registry_inputs(tmp_path / "compatible", compatible=True)
    first = register(cfg, paths, {**fingerprint, "upgrade_key": "k1"})
    assert first["registered"] and first["version"] == 1 and first["alias"] == "challenger"
    run = client.get_run(first["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/mixbct/")  # written through the server
    assert run.data.tags["registration"] == f"{MODEL}/1" and run.data.metrics["onnx.max_abs_diff"] < 1e-4
    assert {p.name for p in artifacts.rglob("*")} >= {"metrics.json", "table.md", "MLmodel", "model.onnx"}
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == "1" and version.tags["gate.passed"] == "True"
    assert version.tags["gallery_sha256"] == "b" * 64 and version.tags["run_id"] == first["run_id"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")  # downloaded through the server
    out = pyfunc.predict(np.zeros((3, 1, 32, 32), dtype=np.float32))
    assert np.asarray(next(iter(out.values())) if isinstance(out, dict) else out).shape == (3, 16)

    second = register(cfg, paths, {**fingerprint, "upgrade_key": "k2"})
    assert second["version"] == 2
    assert find_registered(cfg.registry, "k1")["version"] == 1  # tag search over REST
    assert find_registered(cfg.registry, "k3") is None

    with pytest.raises(UpgradeError, match="no @champion"):
        rollback(cfg.registry)
    assert promote(cfg.registry, "1") == {"model_name": MODEL, "champion": 1, "previous": None}
    assert promote(cfg.registry) == {"model_name": MODEL, "champion": 2, "previous": 1}  # the challenger
    assert client.get_registered_model(MODEL).aliases == {"challenger": "2", "champion": "2"}
    assert rollback(cfg.registry) == {"model_name": MODEL, "champion": 1, "rolled_back_from": 2}
    assert client.get_registered_model(MODEL).aliases == {"challenger": "2", "champion": "1"}
    with pytest.raises(UpgradeError, match="no version 9"):
        promote(cfg.registry, "9")


@pytest.mark.slow
def test_unreachable_registry_fails_clearly_and_writes_nothing(server, registry_inputs, tmp_path: Path) -> None:
    url, _ = server
    client = MlflowClient(tracking_uri=url, registry_uri=url)

    def snapshot() -> tuple:
        versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
        aliases = client.get_registered_model(MODEL).aliases if versions else {}
        runs = sorted(r.info.run_id for r in client.search_runs(
            [e.experiment_id for e in client.search_experiments()]))  # fmt: skip
        return versions, aliases, runs

    before = snapshot()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    paths, fingerprint = registry_inputs(tmp_path / "compatible", compatible=True)
    start = time.monotonic()
    with pytest.raises(UpgradeError, match=f"registry.tracking_uri {dead}: cannot use the MLflow tracking store"):
        register(_cfg(tmp_path, dead), paths, fingerprint)
    assert time.monotonic() - start < 60
    with pytest.raises(UpgradeError, match="cannot use the MLflow tracking store"):
        promote(_cfg(tmp_path, dead).registry)
    assert snapshot() == before  # the live server saw nothing
