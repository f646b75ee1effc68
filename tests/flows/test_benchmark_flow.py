"""A tiny benchmark grid through the real Prefect flow: shared work once, report + plots, MLflow runs, resume."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from flows.benchmark import benchmark
from markdown_cells import content


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_tiny_grid_shares_work_reports_logs_and_resumes(params_factory, tmp_path: Path) -> None:
    params = params_factory()
    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump({"description": "tiny", "blocks": [{"axes": {"train.method": ["mixbct", "l2"]}}]}))
    work, docs = tmp_path / "bench", tmp_path / "docs"

    result = benchmark(grid=str(grid), params=str(params), workdir=str(work), report=str(docs))
    assert result["cells"] == 2 and len(result["ran"]) == 2
    root = work / "tiny"
    assert len(list((root / "shared/legacy").iterdir())) == 1  # one old model for both methods
    assert len(list((root / "shared/features").iterdir())) == 1
    assert len(list((root / "shared/paragon").iterdir())) == 1
    assert len(list((root / "shared/new").iterdir())) == 2
    cells = sorted((root / "cells").glob("*/cell.json"))
    assert len(cells) == 2
    for cell in cells:
        assert (cell.parent / "legacy").is_symlink() and (cell.parent / "eval/metrics.json").is_file()
    text = (docs / "results.md").read_text()
    methods = {line[0] for line in content(text) if isinstance(line, list)}
    assert {"mixbct", "l2"} <= methods and "## Claims as found" in text
    assert (docs / "cross_by_method.png").is_file() and (docs / "tradeoff.png").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("mixbct-upgrade")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "benchmark-tiny"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.params["train.method"] for c in children} == {"mixbct", "l2"}
    assert all("new/old.top1" in c.data.metrics and "criterion.passed" in c.data.tags for c in children)
    assert client.search_registered_models() == []  # the benchmark registers nothing

    # resume: only the cell whose cell.json is gone runs again; nothing shared is rebuilt
    gone, kept = cells
    kept_mtime = kept.stat().st_mtime_ns
    legacy_mtime = next((root / "shared/legacy").iterdir()).stat().st_mtime_ns
    gone.unlink()
    # and a temp file that a killed atomic write left in shared work is swept, never taken for output
    stale = next((root / "shared/new").iterdir()) / "new" / ".model.pt.x1y2z3ab.mixbct-tmp.pt"
    stale.write_bytes(b"half a checkpoint")
    again = benchmark(grid=str(grid), params=str(params), workdir=str(work), report=str(docs))
    assert again["ran"] == [gone.parent.name]
    assert not stale.exists()
    assert gone.is_file() and kept.stat().st_mtime_ns == kept_mtime
    assert next((root / "shared/legacy").iterdir()).stat().st_mtime_ns == legacy_mtime
