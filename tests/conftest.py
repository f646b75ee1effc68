"""Shared fixtures. The environment is set before Prefect or MLflow is imported anywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

_HOME = tempfile.mkdtemp(prefix="mixbct-tests-")
from flows.cli import OFFLINE_ENV  # noqa: E402  (imports no Prefect or MLflow)

for key, value in {
    **OFFLINE_ENV,
    "PREFECT_HOME": os.path.join(_HOME, "prefect"),
    "MIXBCT_PROGRESS": "0",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ[key] = value

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kanjivg_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded KanjiVG source copied from the installed package once per session (a clean clone has no
    data/kanjivg until `make data`)."""
    from components.data.kanjivg import copy_source

    raw = tmp_path_factory.mktemp("kanjivg") / "raw"
    copy_source(raw)
    return raw


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


def registry_inputs_in(root: Path, compatible: bool) -> tuple[Any, dict[str, str]]:
    """What `stages.register` reads, in a fresh work folder `root`, without training anything.

    The evaluation is real (faiss metrics and the criterion on synthetic embeddings: `compatible` ones are less
    noisy in the old space, the others a rotated space); the model is a real small_cnn with its ONNX export.
    Returns the Paths and a fingerprint.
    """
    import numpy as np

    from components.config import EvaluateConfig
    from components.embed import export_onnx, save_backbone
    from components.io import write_json
    from components.plots import backfill_png
    from components.stages import _evaluate_set
    from components.stats import backfill_curves
    from components.models import build_backbone
    from components.paths import Paths

    paths = Paths(root)
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
    features = {"old": old, "new": new}
    (table, verdict, _), record = _evaluate_set(EvaluateConfig(), features, yq, yb, [("old", "old"), ("new", "old"), ("new", "new")], False)
    assert verdict.passed == compatible
    curves = backfill_curves(new[0], yq, old[1], new[1], yb, table.rows[("old", "old")])
    paths.eval.mkdir(parents=True)
    write_json(paths.eval / "metrics.json", {**record, "backfill": {o: c.to_dict() for o, c in curves.items()}})
    (paths.eval / "table.md").write_text(table.markdown(verdict))
    backfill_png(curves, table.rows[("old", "old")], paths.eval / "backfill.png")
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
def registry_inputs():
    """`registry_inputs(root, compatible)`: a work folder ready for registration (see registry_inputs_in)."""
    return registry_inputs_in


@pytest.fixture(autouse=True)
def _log_streams_alive():
    """Prefect's console handler (also on the `components` logger) keeps the stream it was configured with; when
    that was a CliRunner's captured stream of an earlier test, now closed, every log line would print a
    '--- Logging error ---' traceback into later tests' output. Point such handlers back at the real stderr."""
    import logging
    import sys

    for name in ("components", "prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                handler.stream = sys.__stderr__  # not setStream(): it flushes the closed stream first
    yield
