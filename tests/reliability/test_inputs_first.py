"""Every input is checked before any work, and the work folder's sweep only ever removes what the project wrote."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from cases import case
from outcome import refused as _refused
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _user_system(tmp_path: Path, params_factory, dim: int = 16, gallery_fix=None) -> Path:
    """A user's old model (ONNX, `dim`-d) and the gallery .npz it wrote, keyed by manifest id, in a params file."""
    from components.config import load_config
    from components.data.manifest import build_manifest, split_rows
    from components.embed import export_onnx
    from components.models import build_backbone

    base = params_factory()
    manifest = build_manifest(load_config(base).data)
    ids = manifest.iloc[split_rows(manifest, "gallery")]["id"].to_numpy().astype(str)
    old = tmp_path / "old"
    old.mkdir()
    export_onnx(build_backbone("small_cnn", dim, 32).eval(), old / "model.onnx", 32)
    embeddings = np.random.default_rng(0).standard_normal((len(ids), 16)).astype(np.float32)
    if gallery_fix is not None:
        embeddings = gallery_fix(embeddings)
    np.savez(old / "gallery.npz", embeddings=embeddings, ids=ids)
    return params_factory(old={"model": str(old / "model.onnx"), "gallery": str(old / "gallery.npz")})


def _nothing_but_reports(work: Path) -> None:
    left = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()) if work.exists() else []
    assert all(p.startswith("reports/") or p in (".lock", ".mixbct-workdir") for p in left), left


@case("inputs first", "`train.batch_size` larger than the new model's training split (e.g. 4,096 on a small folder)",
      "`mixbct stage prepare` exits 1 naming train.batch_size, its value and the split's size; no dataset written")
def test_batch_larger_than_its_split(tmp_path: Path, params_factory) -> None:
    params = params_factory(train={"batch_size": 4096})
    result = runner.invoke(app, ["stage", "prepare", "-p", str(params), "-w", str(tmp_path / "work")])
    _refused(result, "train.batch_size = 4096", "new_train split")
    _nothing_but_reports(tmp_path / "work")


@case("inputs first", "old gallery with a NaN row, given with the old model",
      "`mixbct stage prepare` exits 1 naming the gallery file and its report, before the dataset is written; "
      "the gallery is never copied into the work folder")
def test_bad_gallery_is_refused_before_the_dataset(tmp_path: Path, params_factory) -> None:
    def poison(e: np.ndarray) -> np.ndarray:
        e[3, 5] = np.nan
        return e

    params = _user_system(tmp_path, params_factory, gallery_fix=poison)
    work = tmp_path / "work"
    result = runner.invoke(app, ["stage", "prepare", "-p", str(params), "-w", str(work)])
    _refused(result, "gallery.npz")
    assert (work / "reports" / "user_gallery_validation.md").is_file()
    _nothing_but_reports(work)


@case("inputs first", "old model whose embeddings are 32-d while train.embedding_dim is 16",
      "`mixbct stage prepare` exits 1 naming the model file and both sizes; nothing written")
def test_old_model_of_another_dimension_is_refused_first(tmp_path: Path, params_factory) -> None:
    params = _user_system(tmp_path, params_factory, dim=32)
    work = tmp_path / "work"
    result = runner.invoke(app, ["stage", "prepare", "-p", str(params), "-w", str(work)])
    _refused(result, "model.onnx", "32-d", "16")
    assert not work.exists() or sorted(p.name for p in work.iterdir()) == [".lock", ".mixbct-workdir"]


@case("work folder", "user files named like temp files (`.chapter1.tex.old`, `.notes.tmp`, `.x.ab12cd34.tmp`) "
      "in a work folder, beside a project temp file a killed write left",
      "the next run's sweep removes only the project's `.NAME.XXXXXXXX.mixbct-tmp` file; every user file survives")
def test_sweep_spares_user_files_of_the_same_shape(tmp_path: Path) -> None:
    from components.io import atomic_path, claim_workdir, exclusive, sweep_stale
    from components.paths import LAYOUT

    work = tmp_path / "work"
    (work / "eval").mkdir(parents=True)
    mine = [work / ".chapter1.tex.old", work / ".notes.tmp", work / "eval" / ".x.ab12cd34.tmp", work / "eval" / ".a.mixbct-old.txt"]
    with exclusive(work):
        claim_workdir(work, LAYOUT)
    for f in mine:
        f.write_text("the user's own")
    # what a writer killed mid-write leaves: its temp file (the `finally` that removes it never ran)
    writer = atomic_path(work / "eval" / "metrics.json")
    stale = writer.__enter__()  # and never __exit__
    stale.write_text("half")
    with exclusive(work):
        removed = sweep_stale(work)
    assert removed == [stale]
    assert all(f.read_text() == "the user's own" for f in mine)


@case("work folder", "`mixbct upgrade -w` pointed at a folder of the user's own files (`.chapter1.tex.old`, `thesis.tex`)",
      "exit 1: 'not a mixbct work folder', naming it, before Prefect starts; nothing written, swept or marked")
def test_foreign_work_folder_is_refused(tmp_path: Path, params_factory) -> None:
    params = params_factory()
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / ".chapter1.tex.old").write_text("draft")
    (thesis / "thesis.tex").write_text("final")
    before = sorted(os.listdir(thesis))
    result = runner.invoke(app, ["upgrade", "-p", str(params), "-w", str(thesis)])
    _refused(result, str(thesis), "not a mixbct work folder")
    assert sorted(os.listdir(thesis)) == before and (thesis / ".chapter1.tex.old").read_text() == "draft"


@case("work folder", "a run's sweep in a work folder without the `.mixbct-workdir` marker (called directly)",
      "nothing is removed, a warning says why")
def test_no_marker_no_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from components.io import exclusive, sweep_stale

    stale = tmp_path / ".metrics.json.ab12cd34.mixbct-tmp"
    stale.write_text("looks like ours")
    with exclusive(tmp_path), caplog.at_level("WARNING", logger="components.io"):
        assert sweep_stale(tmp_path) == []
    assert stale.exists() and "marker" in caplog.text


@case("registry", "`mixbct doctor` on a healthy store (after a complete registration)",
      "exit 0; nothing deleted or failed; lists the complete versions and aliases")
def test_doctor_on_a_healthy_store(tmp_path: Path, registry_inputs) -> None:
    from components.config import load_config
    from components.stages import register

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, {"train.embedding_dim": 16, "legacy.embedding_dim": 16, "registry.tracking_uri": tracking,
                             "registry.artifact_root": str(tmp_path / "mla")})  # fmt: skip
    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    register(cfg, paths, fingerprint)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"registry": {"tracking_uri": tracking, "artifact_root": str(tmp_path / "mla")}}))
    result = runner.invoke(app, ["doctor", "-p", str(params)])
    assert result.exit_code == 0, result.output
    assert "complete versions [1]" in result.output and "'challenger': 1" in result.output
    assert "deleted" not in result.output and "FAILED" not in result.output
