"""Shared fixtures. The environment is set before Prefect or MLflow is imported anywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

_HOME = tempfile.mkdtemp(prefix="mixbct-tests-")
for key, value in {
    "PREFECT_HOME": os.path.join(_HOME, "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MIXBCT_PROGRESS": "0",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ[key] = value

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(tmp: Path, **sections: dict) -> Path:
    """A params.yaml for a seconds-long upgrade on the embedded data, with its own MLflow store in `tmp`."""
    from components.data.kanjivg import copy_source

    raw = tmp.parent / "kanjivg-raw"
    if not raw.exists():
        copy_source(raw)
    params = {
        "data": {
            "root": str(raw), "train_identities": 60, "test_identities": 40, "samples_per_identity": 6,
            "gallery_per_identity": 1, "query_per_identity": 2,
        },
        "legacy": {"epochs": 2, "batch_size": 32, "embedding_dim": 16},
        "train": {"epochs": 2, "batch_size": 32, "embedding_dim": 16},
        "registry": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_root": str(tmp / "mlartifacts")},
    }  # fmt: skip
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def params_factory(tmp_path: Path):
    def make(**sections: dict) -> Path:
        return tiny_params(tmp_path, **sections)

    return make


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (startup costs ~10 s; never per test)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
