"""`dvc repro` on a tiny copy of the project: runs every stage once, then does no work, then only what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_repro_is_incremental(tmp_path: Path) -> None:
    from components.data.kanjivg import copy_source

    project = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel == "data.dvc":
            continue  # tracked again below for the copied raw data
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, project / rel)
    copy_source(project / "data" / "kanjivg")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(train_identities=60, test_identities=40, samples_per_identity=6, gallery_per_identity=1,
                          query_per_identity=2)  # fmt: skip
    params["legacy"].update(epochs=1, batch_size=32, embedding_dim=16)
    params["train"].update(epochs=1, batch_size=32, embedding_dim=16)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["dvc", "add", "-q", "data"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], project)

    first = _run(["dvc", "repro"], project)
    for stage in ("prepare", "legacy", "extract", "train", "paragon", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first, stage
    assert (project / "artifacts/eval/metrics.json").is_file()
    second = _run(["dvc", "repro"], project)
    assert "Running stage" not in second

    metrics = _run(["dvc", "metrics", "show", "--json"], project)
    assert "new/old" in metrics

    params["evaluate"]["gate_metrics"] = ["top5"]  # downstream of evaluate only
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], project)
    ran = {line.split("'")[1] for line in third.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate", "register"}, third
