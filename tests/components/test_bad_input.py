"""Bad input ends with a message naming the file or field, a non-zero exit, and nothing half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from components.config import load_config
from components.errors import ConfigError
from flows.cli import app

runner = CliRunner()


def _stage(name: str, params: Path, work: Path):
    return runner.invoke(app, ["stage", name, "--params", str(params), "--workdir", str(work)])


def test_unknown_key_names_the_field(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochz": 3}}))
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        load_config(p)
    result = _stage("prepare", p, tmp_path / "work")
    assert result.exit_code == 1 and "train.epochz" in result.output
    assert not (tmp_path / "work").exists()


def test_mistyped_value_names_the_field(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"legacy": {"epochs": "ten"}}))
    with pytest.raises(ConfigError, match=r"legacy\.epochs"):
        load_config(p)


def test_unknown_method_lists_known_ones(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"train": {"method": "mixbtc"}}))
    result = runner.invoke(app, ["upgrade", "--params", str(p), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "train.method" in result.output and "mixbct" in result.output
    assert not (tmp_path / "w").exists()


def test_corrupt_image_stops_before_anything_is_written(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for i in range(8):
        for j in range(3):
            (root / f"id{i}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / f"id{i}" / f"{j}.png")
    (root / "id3" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data": {"source": "imagefolder", "root": str(root), "test_identities": 3, "val_identities": 0},
                                 "legacy": {"batch_size": 4}, "train": {"batch_size": 4}}))
    result = _stage("prepare", p, tmp_path / "work")
    assert result.exit_code == 1
    assert "id3/1.png" in result.output
    assert not (tmp_path / "work" / "dataset").exists()
    assert (tmp_path / "work" / "reports" / "data_validation.md").is_file()


def test_missing_image_is_named(tmp_path: Path) -> None:
    from components.data.imagefolder import load_image
    from components.errors import DataError

    with pytest.raises(DataError, match="nope.png"):
        load_image(tmp_path / "nope.png", 32)


def _legacy_run(params_factory, tmp_path: Path, **old: str) -> tuple[Path, Path]:
    work = tmp_path / "work"
    base = params_factory()
    assert _stage("prepare", base, work).exit_code == 0
    return params_factory(old=old), work


def test_old_model_with_other_dimension_is_refused(params_factory, tmp_path: Path) -> None:
    from components.embed import export_onnx
    from components.models import build_backbone

    onnx_path = tmp_path / "old8.onnx"
    export_onnx(build_backbone("small_cnn", 8, 32), onnx_path, 32)  # train.embedding_dim is 16 here
    base = params_factory()
    work = tmp_path / "work"
    assert _stage("prepare", base, work).exit_code == 0
    from components.data.manifest import split_rows
    from components.stages import load_manifest
    from components.paths import Paths

    n_gallery = len(split_rows(load_manifest(Paths(work)), "gallery"))
    np.save(tmp_path / "g.npy", np.ones((n_gallery, 8), dtype=np.float32))
    p = params_factory(old={"model": str(onnx_path), "gallery": str(tmp_path / "g.npy")})
    assert _stage("legacy", p, work).exit_code == 0
    result = _stage("extract", p, work)
    assert result.exit_code == 1
    assert "old8.onnx" in result.output and "8-d" in result.output and "16" in result.output
    assert not (work / "old_features").exists()


@pytest.mark.parametrize("problem", ["nan", "shape"])
def test_bad_gallery_file_is_refused(problem: str, params_factory, tmp_path: Path) -> None:
    from components.embed import export_onnx
    from components.models import build_backbone

    onnx_path = tmp_path / "old.onnx"
    export_onnx(build_backbone("small_cnn", 16, 32), onnx_path, 32)
    work = tmp_path / "work"
    assert _stage("prepare", params_factory(), work).exit_code == 0
    from components.data.manifest import split_rows
    from components.paths import Paths
    from components.stages import load_manifest

    n_gallery = len(split_rows(load_manifest(Paths(work)), "gallery"))
    gallery = np.random.default_rng(0).standard_normal((n_gallery, 16)).astype(np.float32)
    if problem == "nan":
        gallery[5, 3] = np.nan
    else:
        gallery = gallery[:-2]
    np.save(tmp_path / "gallery.npy", gallery)
    p = params_factory(old={"model": str(onnx_path), "gallery": str(tmp_path / "gallery.npy")})
    assert _stage("legacy", p, work).exit_code == 0
    result = _stage("extract", p, work)
    assert result.exit_code == 1
    assert "gallery.npy" in result.output
    assert ("row" in result.output) if problem == "nan" else ("row count" in result.output.lower() or "rows" in result.output)
    assert not (work / "old_features").exists()
