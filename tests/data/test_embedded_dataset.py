"""Expectations on the embedded default dataset itself, at the size params.yaml asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_config
from components.data.manifest import build_manifest, decoder, num_classes
from components.validation import validate_manifest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from components.data.kanjivg import copy_source

    root = tmp_path_factory.mktemp("kanjivg")
    copy_source(root)
    return root


# ~15 s each: the default scenario in the default suite, the three others in `make test-all` (CI)
@pytest.mark.parametrize("scenario", ["open-class", *(pytest.param(s, marks=pytest.mark.slow) for s in
                                                      ("open-data", "extended-class", "extended-data"))])  # fmt: skip
def test_default_manifest_passes_its_suite(raw: Path, scenario: str) -> None:
    cfg = load_config(ROOT / "params.yaml", {"data.root": str(raw), "data.scenario": scenario}).data
    manifest = build_manifest(cfg)
    classes = num_classes(manifest)
    report = validate_manifest(manifest, classes, decoder(cfg), str(raw), shared_train_samples=scenario.startswith("extended"))
    assert report.success, report.failures
    assert classes["test"] == cfg.test_identities
    counts = manifest["split"].value_counts()
    assert counts["gallery"] == cfg.test_identities * cfg.gallery_per_identity
    assert counts["query"] == cfg.test_identities * cfg.query_per_identity
    train_ids = set(manifest.loc[manifest["split"].str.endswith("train"), "identity"])
    test_ids = set(manifest.loc[manifest["split"].isin(["gallery", "query"]), "identity"])
    assert not train_ids & test_ids
    old_ids = set(manifest.loc[manifest["split"] == "old_train", "identity"])
    new_ids = set(manifest.loc[manifest["split"] == "new_train", "identity"])
    if scenario == "open-class":
        assert not old_ids & new_ids
        assert abs(len(old_ids) / (len(old_ids) + len(new_ids)) - cfg.old_fraction) < 0.01
    elif scenario == "extended-class":
        assert old_ids < new_ids
    else:
        assert old_ids == new_ids


def test_splits_do_not_depend_on_file_order(raw: Path) -> None:
    cfg = load_config(ROOT / "params.yaml", {"data.root": str(raw)}).data
    a = build_manifest(cfg)
    b = build_manifest(cfg)
    assert a.equals(b)
    other = build_manifest(load_config(ROOT / "params.yaml", {"data.root": str(raw), "data.seed": 1}).data)
    assert set(a.loc[a.split == "gallery", "identity"]) != set(other.loc[other.split == "gallery", "identity"])
