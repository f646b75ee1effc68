"""`dvc push` to a local remote, then a fresh git clone elsewhere pulls everything back and has nothing to redo.

The copy pushes to the project's default remote `local` (.dvc/config: `../../mixbct-dvc-remote`, a sibling of
the checkout, here inside tmp). The clone lives in another folder, so it is pointed at the same remote with
`dvc remote add --local -d`; with a cache of its own, whatever it gets comes from the remote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from project_copy import copy_project, git_commit, run

REQUIRED = ("data/kanjivg", "artifacts/dataset/manifest.csv", "artifacts/dataset/images.npy",
            "artifacts/legacy/model.onnx", "artifacts/legacy/gallery.npy", "artifacts/new/model.onnx",
            "artifacts/paragon/model.onnx", "artifacts/eval/metrics.json")  # fmt: skip


def _tracked(project: Path) -> list[str]:
    """Every path DVC tracks: data (data.dvc) and each stage output (dvc.lock)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])]
    return ["data", *outs]


def _md5s(project: Path, tracked: list[str]) -> dict[str, str]:
    files = {}
    for rel in tracked:
        root = project / rel
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            files[str(path.relative_to(project))] = hashlib.md5(path.read_bytes()).hexdigest()
    return files


@pytest.mark.slow
def test_push_then_clone_and_pull_restores_everything(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    remote = tmp_path / "mixbct-dvc-remote"
    assert run(["dvc", "remote", "default"], project).strip() == "local"
    assert str(remote) in run(["dvc", "remote", "list"], project)  # relative to .dvc/: next to the checkout

    run(["dvc", "repro"], project)
    git_commit(project, "repro")  # dvc.lock
    run(["dvc", "push"], project)
    assert any((remote / "files" / "md5").rglob("*")), "nothing pushed"
    tracked = _tracked(project)
    original = _md5s(project, tracked)
    for rel in REQUIRED:
        assert any(f == rel or f.startswith(rel + "/") for f in original), rel

    plots = run(["dvc", "plots", "show"], project)
    index = project / "dvc_plots" / "index.html"
    assert index.is_file() and "index.html" in plots, plots
    html = index.read_text()
    assert "roc_new_old.csv" in html and "history.csv" in html  # both plot groups rendered

    clone = tmp_path / "elsewhere" / "clone"
    clone.parent.mkdir()
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "artifacts").exists() and not (clone / "data").exists()
    run(["dvc", "remote", "add", "--local", "-d", "shared", str(remote)], clone)
    run(["dvc", "pull"], clone)
    assert _md5s(clone, tracked) == original

    status = run(["dvc", "status"], clone)
    assert "Data and pipelines are up to date" in status, status
    again = run(["dvc", "repro"], clone)
    assert "Running stage" not in again, again
