"""The evaluation sets a reviewer needs: a validation split where choices are made, a shifted set, and what the
evaluate stage reports on them (intervals, negative flips, partial backfill); training-free maps and the old head
through the real stages, on the embedded data at seconds-long size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components import pipeline
from components.config import DataConfig, load_config
from components.data.manifest import SHIFT_VARIANT, build_manifest
from components.paths import Paths


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from components.data.kanjivg import copy_source

    root = tmp_path_factory.mktemp("kanjivg") / "kanji"
    copy_source(root)
    return root


def _cfg(raw: Path, **extra) -> DataConfig:
    return DataConfig(root=str(raw), train_identities=300, test_identities=200, samples_per_identity=4, **extra)


def test_validation_identities_are_disjoint_and_leave_training_and_test_unchanged(raw: Path) -> None:
    with_val = build_manifest(_cfg(raw, val_identities=30))
    without = build_manifest(_cfg(raw, val_identities=0))
    ids = {s: set(with_val.loc[with_val["split"] == s, "identity"]) for s in with_val["split"].unique()}
    val, test = ids["val_gallery"], ids["gallery"]
    train = ids["old_train"] | ids["new_train"]
    assert len(val) == 30 and ids["val_query"] == val
    assert not val & test and not val & train and not test & train
    keep = ["split", "identity", "sample", "label"]
    for split in ("old_train", "new_train", "gallery", "query"):
        a = with_val.loc[with_val["split"] == split, keep].reset_index(drop=True)
        b = without.loc[without["split"] == split, keep].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    assert build_manifest(_cfg(raw)).query("split == 'val_gallery'")["identity"].nunique() == 20  # null: a tenth


def test_shifted_set_is_the_test_identities_variant_forms_in_fresh_renderings(raw: Path) -> None:
    m = build_manifest(_cfg(raw))
    test = m[m["split"].isin(["gallery", "query"])]
    shift = m[m["split"].isin(["shift_gallery", "shift_query"])]
    with_variant = {i for i in test["identity"].unique() if (raw / f"{i}-{SHIFT_VARIANT}.svg").is_file()}
    assert set(shift["identity"]) == with_variant and 0 < len(with_variant) < test["identity"].nunique()
    assert shift["source"].str.endswith(f"-{SHIFT_VARIANT}.svg").all()
    assert shift["sample"].min() > test["sample"].max()  # new draws of the jitter, not the in-domain twins
    label = dict(zip(test["identity"], test["label"], strict=False))
    assert (shift["identity"].map(label) == shift["label"]).all()  # the test labels: searchable in either gallery
    val = m[m["split"].isin(["val_gallery", "val_query"])]
    val_shift = m[m["split"].isin(["val_shift_gallery", "val_shift_query"])]
    assert set(val_shift["identity"]) <= set(val["identity"]) and len(val_shift)
    assert not build_manifest(_cfg(raw, shift="none"))["split"].str.contains("shift").any()


def _run(tmp: Path, raw: Path, stages: tuple[str, ...], **sections: dict) -> tuple[Paths, object]:
    from conftest import tiny_params

    tmp.mkdir(parents=True, exist_ok=True)
    sections["data"] = {"root": str(raw), **sections.get("data", {})}
    params = tiny_params(tmp, **sections)
    cfg = load_config(params)
    paths = Paths(tmp / "work")
    for name in stages:
        pipeline.run(name, cfg, paths)
    return paths, cfg


def test_evaluate_reports_every_set_with_intervals_flips_and_backfill(tmp_path: Path, raw: Path) -> None:
    paths, _ = _run(tmp_path, raw, ("prepare", "legacy", "extract", "train", "evaluate"),
                    train={"method": "slerp", "paragon": False})  # fmt: skip
    info = json.loads((paths.model_dir("new") / "info.json").read_text())
    assert info["chosen_on"] == "validation" and len(info["training_free"]["validation_table"]) == 11
    metrics = json.loads((paths.eval / "metrics.json").read_text())
    assert set(metrics["sets"]) == {"shift", "shift_query", "validation", "validation_shift"}
    assert metrics["criterion"]["require"] == "interval"
    for record in (metrics, *metrics["sets"].values()):
        diffs = record["bootstrap"]["differences"]["new/old - old/old"]
        pairs = record["pairs"]
        assert diffs["top1"]["point"] == pytest.approx(pairs["new/old"]["top1"] - pairs["old/old"]["top1"])
        assert diffs["top1"]["lo"] <= diffs["top1"]["point"] <= diffs["top1"]["hi"]
        assert set(record["bootstrap"]["negative_flips"]) == {"old/old -> new/old", "old/old -> new/new"}
    for curve in metrics["backfill"].values():  # β = 0: new/old; β = 1: new/new, with evaluate's numbers
        for metric, values in curve["values"].items():
            assert values[0] == pytest.approx(metrics["pairs"]["new/old"][metric], abs=1e-12)
            assert values[-1] == pytest.approx(metrics["pairs"]["new/new"][metric], abs=1e-12)
    table = (paths.eval / "table.md").read_text()
    for heading in ("## shift:", "## shift_query:", "## validation:", "## validation_shift:", "Partial backfill",
                    "Negative flips"):
        assert heading in table
    assert "index" not in metrics and "Search index" not in table  # exact search: nothing to report

    # The same models searched through an approximate index: every metric comes from it, its recall is reported.
    from components.evaluate import current_index
    from components.registry import evaluation_metrics

    from conftest import tiny_params

    cfg = load_config(tiny_params(tmp_path, data={"root": str(raw)}, train={"method": "slerp", "paragon": False},
                                  evaluate={"index": "IVF4,Flat", "index_params": "nprobe=1"}))  # fmt: skip
    pipeline.run("evaluate", cfg, paths)
    assert current_index() == ("Flat", "")  # restored after the stage
    ivf = json.loads((paths.eval / "metrics.json").read_text())
    assert ivf["index"]["factory"] == "IVF4,Flat" and set(ivf["index"]["pairs"]) == {"old/old", "new/old", "new/new"}
    recalls = [p["index.recall@1"] for p in ivf["index"]["pairs"].values()]
    assert all(0 < r <= 1 for r in recalls) and min(recalls) < 1  # one list of 4 probed: some misses
    assert "### Search index: `IVF4,Flat` nprobe=1" in (paths.eval / "table.md").read_text()
    assert "new/old.index.recall_1" in evaluation_metrics(ivf)
    assert (paths.eval / "backfill.png").read_bytes()[:4] == b"\x89PNG"


def test_training_free_model_is_one_onnx_graph_that_matches_torch(tmp_path: Path, raw: Path) -> None:
    from components.embed import load_backbone, onnx_parity
    from components.preprocess import to_input
    from components.stages import split_arrays

    paths, cfg = _run(tmp_path, raw, ("prepare", "legacy", "extract", "paragon"), train={"method": "procrustes"})
    for stale in (paths.root / "checkpoints").glob("paragon-*.pt"):
        stale.unlink()  # a retrained paragon would leave its checkpoint again
    pipeline.run("train", cfg, paths)
    assert not list((paths.root / "checkpoints").glob("paragon-*.pt")), "the trained paragon was trained again"
    model, meta = load_backbone(paths.model_dir("new") / "model.pt")
    assert meta["arch"] == "procrustes"
    paragon, _ = load_backbone(paths.model_dir("paragon") / "model.pt")
    images, _ = split_arrays(paths, "gallery")
    with torch.inference_mode():  # the map sits on this very paragon
        x = to_input(torch.from_numpy(images[:8]))
        mapped = torch.nn.functional.normalize(torch.nn.functional.normalize(paragon(x), dim=1) @ model.R, dim=1)
        assert torch.allclose(model(x), mapped, atol=1e-5)
    assert onnx_parity(model, paths.model_dir("new") / "model.onnx", images[:64]) < 1e-4


def test_bct_gets_the_old_heads_rows_only_for_classes_the_old_model_saw(tmp_path: Path, raw: Path) -> None:
    from components.stages import _old_classifier

    for scenario, expect_known in (("extended-class", True), ("open-class", False)):
        paths, cfg = _run(tmp_path / scenario, raw, ("prepare", "legacy"), data={"scenario": scenario})
        rows, known = _old_classifier(paths, 60, cfg.train.embedding_dim)
        manifest = pd.read_csv(paths.manifest, dtype={"identity": str})
        old_ids = set(manifest.loc[manifest["split"] == "old_train", "identity"])
        new = manifest[manifest["split"] == "new_train"].groupby("label")["identity"].first()
        assert known.tolist() == [name in old_ids for name in new.reindex(range(60)).tolist()]
        assert known.any() == expect_known
        with np.load(paths.legacy / "head.npz") as z:
            weight, names = z["weight"], z["identities"].tolist()
        for label in np.flatnonzero(known)[:5]:
            assert np.array_equal(rows[label], weight[names.index(new[label])])


def test_a_map_on_top_of_mixbct_sits_on_the_mixbct_model_a_mixbct_cell_trains(tmp_path: Path, raw: Path) -> None:
    """Shift study: method_args.base = mixbct fits the map on the very MixBCT model (same recipe, same checkpoint)."""
    from components.embed import load_backbone
    from components.preprocess import to_input
    from components.stages import split_arrays

    mixbct = {"method": "mixbct", "method_args": {"alpha": 0.5}}
    paths, cfg = _run(tmp_path, raw, ("prepare", "legacy", "extract", "train"), train=mixbct)
    trained = set((paths.root / "checkpoints").glob("new-*.pt"))
    base, _ = load_backbone(paths.model_dir("new") / "model.pt")
    on_top = cfg.train.model_copy(update={"method": "procrustes", "method_args": {
        "base": "mixbct", "base_args": cfg.train.method_args}})  # MixBCT's resolved arguments, as validation gives
    pipeline.run("train", cfg.model_copy(update={"train": on_top}), paths)
    assert set((paths.root / "checkpoints").glob("new-*.pt")) == trained, "the MixBCT model was trained again"
    model, meta = load_backbone(paths.model_dir("new") / "model.pt")
    assert meta["arch"] == "procrustes"
    images, _ = split_arrays(paths, "gallery")
    with torch.inference_mode():
        x = to_input(torch.from_numpy(images[:8]))
        mapped = torch.nn.functional.normalize(torch.nn.functional.normalize(base(x), dim=1) @ model.R, dim=1)
        assert torch.allclose(model(x), mapped, atol=1e-5)
