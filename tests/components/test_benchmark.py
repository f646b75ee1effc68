"""The benchmark's plain-library parts: grid expansion, shared-work keys, aggregation and the computed claims."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from components import benchmark as bm
from components.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, spec: dict) -> bm.Grid:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return bm.load_grid(str(path))


def test_expansion_is_the_union_of_block_cross_products(tmp_path: Path) -> None:
    grid = _grid(tmp_path, {"base": {"train.epochs": 1}, "blocks": [
        {"axes": {"train.method": ["mixbct", "l2"], "train.seed": [0, 1]}},
        {"axes": {"train.method": ["mixbct"], "train.seed": [0]}},  # duplicate of a cell above: run once
        {"set": {"train.method": "mixbct"}, "axes": {"train.alpha": [0.1]}},
    ]})  # fmt: skip
    assert grid.name == "tiny" and len(grid.cells) == 5
    assert all(c.overrides["train.epochs"] == 1 for c in grid.cells)
    assert [c.ablation for c in grid.cells].count("train.alpha=0.1") == 1
    again = _grid(tmp_path, yaml.safe_load((tmp_path / "tiny.yaml").read_text()))
    assert [c.id for c in again.cells] == [c.id for c in grid.cells]  # stable ids
    assert len({c.id for c in grid.cells}) == 5


def test_named_grids_are_valid_and_unknown_names_fail() -> None:
    for name in ("quick", "full"):
        grid = bm.load_grid(name, ROOT / "benchmarks/grid.yaml")
        plans = bm.plan(grid, ROOT / "params.yaml", "/nonexistent")  # every override validates
        assert len({p.keys["new"] for p in plans}) == len(plans)
    full = bm.load_grid("full", ROOT / "benchmarks/grid.yaml")
    settings = ("data.scenario", "legacy.head", "train.embedding_dim")
    headline = [c for c in full.cells if c.ablation == "-" and not any(k in c.overrides for k in settings)]
    assert {c.overrides["train.seed"] for c in headline} == {0, 1, 2}
    assert len(headline) == 9 * 3  # every method, three seeds
    with pytest.raises(ConfigError, match="unknown grid"):
        bm.load_grid("nope", ROOT / "benchmarks/grid.yaml")


def test_cells_differing_only_in_method_share_everything_but_the_new_model(tmp_path: Path) -> None:
    grid = _grid(tmp_path, {"blocks": [{"axes": {"train.method": ["mixbct", "bct"]}},
                                       {"axes": {"legacy.head": ["arcface"], "train.method": ["mixbct"]}}]})
    a, b, strong = bm.plan(grid, ROOT / "params.yaml", tmp_path / "work")
    for piece in ("data", "legacy", "features", "paragon"):
        assert a.keys[piece] == b.keys[piece], piece
        assert bm.output(a, piece) == bm.output(b, piece)
    assert a.keys["new"] != b.keys["new"]
    # another old model: new legacy and old features, same data and paragon (the paragon never sees the old model)
    assert strong.keys["data"] == a.keys["data"] and strong.keys["paragon"] == a.keys["paragon"]
    assert strong.keys["legacy"] != a.keys["legacy"] and strong.keys["features"] != a.keys["features"]


def test_cell_links_point_at_shared_folders(tmp_path: Path) -> None:
    grid = _grid(tmp_path, {"blocks": [{"axes": {"train.method": ["mixbct", "l2"]}}]})
    a, b = bm.plan(grid, ROOT / "params.yaml", tmp_path / "work")
    for plan in (a, b):
        for piece in bm.PIECES:
            bm.output(plan, piece).mkdir(parents=True, exist_ok=True)
        paths = bm.link_cell(plan)
        bm.link_cell(plan)  # idempotent
        assert paths.legacy.is_symlink() and paths.legacy.resolve() == bm.output(plan, "legacy").resolve()
    assert a.paths.old_features.resolve() == b.paths.old_features.resolve()
    assert a.paths.model_dir("paragon").resolve() == b.paths.model_dir("paragon").resolve()
    assert a.paths.model_dir("new").resolve() != b.paths.model_dir("new").resolve()
    root = bm.link_inputs(a, "new")
    assert root.dataset.resolve() == bm.output(a, "data").resolve()
    assert not bm.is_done(a)


def _record(method: str, seed: int, oo: float, no: float, nn: float, passed: bool, scenario: str = "open-class",
            old: str = "softmax", dim: int = 128, ablation: str = "-") -> dict:
    metric = lambda v: {"top1": v, "mAP": v, "tar@far=1e-3": v}  # noqa: E731
    return {"id": f"{method}-{seed}", "method": method, "seed": seed, "scenario": scenario, "old": old, "dim": dim,
            "ablation": ablation, "overrides": {}, "pairs": {"old/old": metric(oo), "new/old": metric(no),
            "new/new": metric(nn)}, "criterion": {"passed": passed, "update_gain": {"top1": 0.5}, "retention": {"top1": 1.0}}}  # fmt: skip


def test_aggregation_is_mean_and_sample_std_over_seeds() -> None:
    records = [_record("mixbct", s, 0.5, v, 0.8, v > 0.5) for s, v in enumerate((0.6, 0.7, 0.4))]
    (row,) = bm.aggregate(records)
    assert row["seeds"] == 3 and row["passes"] == 2
    mean, std = row["new/old.top1"]
    assert mean == pytest.approx(17 / 30) and std == pytest.approx(math.sqrt(((0.6 - 17 / 30) ** 2 + (0.7 - 17 / 30) ** 2 + (0.4 - 17 / 30) ** 2) / 2))
    assert row["old/old.top1"] == (pytest.approx(0.5), pytest.approx(0.0))
    single = bm.aggregate([_record("l2", 0, 0.5, 0.6, 0.7, True)])[0]
    assert single["new/new.mAP"] == (pytest.approx(0.7), 0.0)


def test_update_gain_and_retention_follow_the_pairs_not_the_recorded_numbers() -> None:
    rec = _record("mixbct", 0, 0.5, 0.6, 0.7, True)
    rec["pairs"]["paragon/paragon"] = {"top1": 0.9, "mAP": 0.9, "tar@far=1e-3": 0.9}
    (row,) = bm.aggregate([rec])  # the recorded update_gain (0.5) is stale: recomputed as (0.6-0.5)/(0.9-0.5)
    assert row["update_gain.top1"][0] == pytest.approx(0.25) and row["retention.top1"][0] == pytest.approx(0.7 / 0.9)
    rec["pairs"]["paragon/paragon"]["top1"] = 0.45  # a paragon below old/old: no gain to share
    assert math.isnan(bm.aggregate([rec])[0]["update_gain.top1"][0])


def test_claims_are_computed_from_the_table() -> None:
    rows = bm.aggregate([
        _record("mixbct", 0, 0.5, 0.60, 0.80, True), _record("bct", 0, 0.5, 0.55, 0.82, True),
        _record("l2", 0, 0.5, 0.62, 0.70, True),
        _record("mixbct", 0, 0.5, 0.45, 0.80, False, scenario="open-data"),
    ])  # fmt: skip
    a, b, c = bm.claims(rows)
    assert a["holds"] is False and "open-data" in a["evidence"]
    assert b["holds"] is False and "l2 0.6200" in b["evidence"]  # mixbct 0.60 < l2 0.62 on cross-test
    assert c["holds"] is True
    rows_ok = bm.aggregate([_record("mixbct", 0, 0.5, 0.70, 0.80, True), _record("l2", 0, 0.5, 0.62, 0.70, True)])
    assert [x["holds"] for x in bm.claims(rows_ok)] == [True, True, True]
    assert [x["holds"] for x in bm.claims(bm.aggregate([_record("none", 0, 0.5, 0.0, 0.9, False)]))] == [None, None, None]


def test_report_and_plots(tmp_path: Path) -> None:
    grid = bm.Grid("hand", {}, ())
    rows = bm.aggregate([_record("mixbct", s, 0.5, 0.6 + s / 100, 0.8, True) for s in range(3)]
                        + [_record("l2", 0, 0.5, 0.55, 0.75, True)])
    out = bm.write_report(grid, rows, tmp_path / "docs", "mixbct benchmark --grid hand")
    text = Path(out["results"]).read_text()
    assert "mixbct benchmark --grid hand" in text and "## Claims as found" in text
    assert "| old/old (reference) |" in text and "pass (3/3)" in text and "0.6100 ± 0.0100" in text
    assert "(b) weak old model" in text and "**holds**" in text
    for name in ("cross_by_method", "tradeoff"):
        assert Path(out[name]).read_bytes()[:4] == b"\x89PNG"


def test_a_none_cell_reuses_the_paragon_instead_of_training_it_again(tmp_path: Path) -> None:
    grid = _grid(tmp_path, {"blocks": [{"axes": {"train.method": ["none", "mixbct"]}}]})
    none, mixbct = bm.plan(grid, ROOT / "params.yaml", tmp_path / "work")
    assert bm.source_piece(none, "new") == "paragon" and bm.source_piece(mixbct, "new") == "new"
    assert bm.output(none, "new") == bm.output(none, "paragon") == bm.output(mixbct, "paragon")
    assert bm.output(mixbct, "new") != bm.output(mixbct, "paragon")


def test_method_none_trains_exactly_the_paragon(params_factory, tmp_path: Path) -> None:
    """What the reuse above relies on: role "new" with method none and role "paragon" give identical weights."""
    import torch

    from components import stages
    from components.config import load_config
    from components.paths import Paths

    cfg = load_config(params_factory(train={"epochs": 1, "batch_size": 32, "embedding_dim": 16, "method": "none"}))
    paths = Paths(tmp_path / "work")
    stages.prepare(cfg.data, paths)
    stages.train(cfg.train, cfg.data.image_size, paths, "new")
    stages.train(cfg.train, cfg.data.image_size, paths, "paragon")
    new, paragon = (torch.load(paths.model_dir(r) / "model.pt", weights_only=True)["state_dict"] for r in ("new", "paragon"))
    assert new.keys() == paragon.keys() and all(torch.equal(new[k], paragon[k]) for k in new)
