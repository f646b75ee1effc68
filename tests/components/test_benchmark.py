"""The benchmark's plain-library parts: grid expansion, shared-work keys; aggregation, claims and the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from components import benchmark as bm
from components import benchmark_report as report
from components.errors import ConfigError
from markdown_cells import content

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, spec: dict) -> bm.Grid:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return bm.load_grid(str(path))


def test_expansion_is_the_union_of_block_cross_products(tmp_path: Path) -> None:
    grid = _grid(tmp_path, {"base": {"train.epochs": 1}, "blocks": [
        {"axes": {"train.method": ["mixbct", "l2"], "train.seed": [0, 1]}},
        {"axes": {"train.method": ["mixbct"], "train.seed": [0]}},  # duplicate of a cell above: run once
        {"set": {"train.method": "mixbct"}, "axes": {"train.method_args.alpha": [0.1]}},
    ]})  # fmt: skip
    assert grid.name == "tiny" and len(grid.cells) == 5
    assert all(c.overrides["train.epochs"] == 1 for c in grid.cells)
    assert [c.ablation for c in grid.cells].count("train.method_args.alpha=0.1") == 1
    again = _grid(tmp_path, yaml.safe_load((tmp_path / "tiny.yaml").read_text()))
    assert [c.id for c in again.cells] == [c.id for c in grid.cells]  # stable ids
    assert len({c.id for c in grid.cells}) == 5


def test_named_grids_are_valid_and_unknown_names_fail() -> None:
    for name in ("quick", "full", "select-default", "shift-study", "skip-replaced"):
        grid = bm.load_grid(name, ROOT / "benchmarks/grid.yaml")
        plans = bm.plan(grid, ROOT / "params.yaml", "/nonexistent")  # every override validates
        assert len({p.keys["new"] for p in plans}) == len(plans)
    full = bm.load_grid("full", ROOT / "benchmarks/grid.yaml")
    settings = ("data.scenario", "legacy.head", "train.embedding_dim")
    headline = [c for c in full.cells if c.ablation == "-" and not any(k in c.overrides for k in settings)]
    assert {c.overrides["train.seed"] for c in headline} == {0, 1, 2}
    seeds: dict[str, set[int]] = {}
    for c in headline:
        seeds.setdefault(c.overrides["train.method"], set()).add(c.overrides["train.seed"])
    variants = {m for m in seeds if m.endswith("_authors")}
    assert variants == {"bct_authors", "unibct_authors", "nccl_authors", "lce_authors"}
    assert all(seeds[m] == {0} for m in variants)  # the authors' variants: one seed, labelled
    assert {m for m in seeds if seeds[m] == {0, 1, 2}} >= {"mixbct", "none", "bct", "lce", "procrustes", "slerp", "adapter"}
    assert len(headline) == 12 * 3 + 4  # every method x three seeds, the variants once
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


def test_a_cell_recorded_under_other_base_params_is_not_done(tmp_path: Path) -> None:
    """A cell id hashes its overrides only: after params.yaml changes, the same id must be computed again, and its
    stale record goes before the new links are made."""
    grid = _grid(tmp_path, {"blocks": [{"axes": {"train.method": ["mixbct"]}}]})
    (before,) = bm.plan(grid, ROOT / "params.yaml", tmp_path / "work")
    for piece in bm.PIECES:
        bm.output(before, piece).mkdir(parents=True, exist_ok=True)
    bm.link_cell(before)
    before.cell_json.write_text("{}")
    assert bm.is_done(before)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["method_args"]["mixbct"]["alpha"] = 0.7
    edited = tmp_path / "params.yaml"
    edited.write_text(yaml.safe_dump(raw))
    (after,) = bm.plan(grid, edited, tmp_path / "work")
    assert after.cell.id == before.cell.id and after.keys["new"] != before.keys["new"]
    assert not bm.is_done(after)
    for piece in bm.PIECES:
        bm.output(after, piece).mkdir(parents=True, exist_ok=True)
    bm.link_cell(after)
    assert not after.cell_json.exists() and bm.is_done(before) is False
    after.cell_json.write_text("{}")
    assert bm.is_done(after)


def _record(method: str, seed: int, oo: float, no: float, nn: float, passed: bool, scenario: str = "open-class",
            old: str = "softmax", dim: int = 128, ablation: str = "-", paragon: float | None = None) -> dict:
    metric = lambda v: {"top1": v, "mAP": v, "tar@far=1e-3": v}  # noqa: E731
    pairs = {"old/old": metric(oo), "new/old": metric(no), "new/new": metric(nn)}
    if paragon is not None:
        pairs["paragon/paragon"] = metric(paragon)
    return {"id": f"{method}-{seed}", "method": method, "seed": seed, "scenario": scenario, "old": old, "dim": dim,
            "ablation": ablation, "overrides": {}, "pairs": pairs,
            "criterion": {"passed": passed, "update_gain": {"top1": 0.5}, "retention": {"top1": 1.0}}}  # fmt: skip


def test_aggregation_is_mean_and_sample_std_over_seeds() -> None:
    records = [_record("mixbct", s, 0.5, v, 0.8, v > 0.5) for s, v in enumerate((0.6, 0.7, 0.4))]
    (row,) = report.aggregate(records)
    assert row["seeds"] == 3 and row["passes"] == 2
    mean, std = row["new/old.top1"]
    assert mean == pytest.approx(17 / 30) and std == pytest.approx(math.sqrt(((0.6 - 17 / 30) ** 2 + (0.7 - 17 / 30) ** 2 + (0.4 - 17 / 30) ** 2) / 2))
    assert row["old/old.top1"] == (pytest.approx(0.5), pytest.approx(0.0))
    single = report.aggregate([_record("l2", 0, 0.5, 0.6, 0.7, True)])[0]
    assert single["new/new.mAP"] == (pytest.approx(0.7), 0.0)


def test_update_gain_and_retention_follow_the_pairs_not_the_recorded_numbers() -> None:
    rec = _record("mixbct", 0, 0.5, 0.6, 0.7, True)
    rec["pairs"]["paragon/paragon"] = {"top1": 0.9, "mAP": 0.9, "tar@far=1e-3": 0.9}
    (row,) = report.aggregate([rec])  # the recorded update_gain (0.5) is stale: recomputed as (0.6-0.5)/(0.9-0.5)
    assert row["update_gain.top1"][0] == pytest.approx(0.25) and row["retention.top1"][0] == pytest.approx(0.7 / 0.9)
    rec["pairs"]["paragon/paragon"]["top1"] = 0.45  # a paragon below old/old: no gain to share
    assert math.isnan(report.aggregate([rec])[0]["update_gain.top1"][0])


def test_claims_are_computed_from_the_table() -> None:
    rows = report.aggregate([
        _record("mixbct", 0, 0.5, 0.60, 0.80, True), _record("bct", 0, 0.5, 0.55, 0.82, True),
        _record("l2", 0, 0.5, 0.62, 0.70, True),
        _record("mixbct", 0, 0.5, 0.45, 0.80, False, scenario="open-data"),
    ])  # fmt: skip
    a, b, c = report.claims(rows)
    assert a["holds"] is False and "open-data" in a["evidence"]
    assert b["holds"] is False and "l2 0.6200" in b["evidence"]  # mixbct 0.60 < l2 0.62 on cross-test
    assert c["holds"] is True
    rows_ok = report.aggregate([_record("mixbct", 0, 0.5, 0.70, 0.80, True), _record("l2", 0, 0.5, 0.62, 0.70, True)])
    assert [x["holds"] for x in report.claims(rows_ok)] == [True, True, True]
    none_only = report.aggregate([_record("none", 0, 0.5, 0.0, 0.9, False)])
    assert [x["holds"] for x in report.claims(none_only)] == [None, None, None]


def test_report_and_plots(tmp_path: Path) -> None:
    grid = bm.Grid("hand", {}, ())
    rows = report.aggregate([_record("mixbct", s, 0.5, 0.6 + s / 100, 0.8, True) for s in range(3)]
                        + [_record("l2", 0, 0.5, 0.55, 0.75, True)])
    out = report.write_report(grid, rows, tmp_path / "docs", "mixbct benchmark --grid hand")
    text = Path(out["results"]).read_text()
    assert "mixbct benchmark --grid hand" in text and "## Claims as found" in text
    table = [line for line in content(text) if isinstance(line, list)]
    assert ["l2", "1", *["0.7500"] * 3, *["0.5500"] * 3, "pass (1/1)", "–", "–"] in table
    assert table[2][0] == "old/old (reference)" and "pass (3/3)" in text and "0.6100 ± 0.0100" in text
    assert "(b) weak old model" in text and "**holds**" in text
    for name in ("cross_by_method", "tradeoff"):
        assert Path(out[name]).read_bytes()[:4] == b"\x89PNG"


def test_review_table_shows_intervals_flips_backfill_shift_and_validation(tmp_path: Path) -> None:
    def iv(point: float, lo: float, hi: float) -> dict[str, float]:
        return {"point": point, "lo": lo, "hi": hi}

    rec = _record("bct_authors", 0, 0.5, 0.6, 0.8, True)
    rec["differences"] = {"new/old - old/old": {"top1": iv(0.1, 0.05, 0.15)}}
    rec["negative_flips"] = {"old/old -> new/old": {"nf_share": iv(0.02, 0.01, 0.03)},
                             "old/old -> new/new": {"nf_share": iv(0.01, 0.0, 0.02)}}  # fmt: skip
    rec["backfill"] = {"random": {"auc": {"top1": 0.7}, "dips": False}, "worst_first": {"auc": {"top1": 0.72}, "dips": True}}
    rec["sets"] = {"shift": {"criterion": {"passed": False}, "differences": {"new/old - old/old": {"top1": iv(-0.03, -0.05, -0.01)}}},
                   "validation": {"differences": {"new/old - old/old": {"top1": iv(0.08, 0, 0)},
                                                  "new/new - old/old": {"top1": iv(0.2, 0, 0)}}}}  # fmt: skip
    old = _record("l2", 0, 0.5, 0.55, 0.75, True)  # recorded before intervals existed: dashes, not zeros
    rows = report.aggregate([rec, old])
    text = report.render(bm.Grid("hand", {}, ()), rows, "cmd", records=[rec, old])
    cells = [line for line in content(text) if isinstance(line, list)]
    assert ["open-class/softmax/d128", "BCT (MixBCT authors' variant: unscaled cosine logits, synthesised classifier)",
            "-", "0", "+8.00 [+0.00, +0.00]", "+20.00 [+0.00, +0.00]", "–", "–"] in cells  # every cell on validation
    assert ["BCT (MixBCT authors' variant: unscaled cosine logits, synthesised classifier)", "+10.00 [+5.00, +15.00]",
            "0.0200", "0.0100", "0.7000", "0.7200", "yes", "-3.00 [-5.00, -1.00]", "+8.00", "+20.00", "–"] in cells
    assert ["l2", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–"] in cells
    assert report._label("slerp") == "slerp (training-free, on the paragon)"


def test_aggregation_leaves_out_missing_values_and_keeps_first_appearance_order() -> None:
    records = [_record("l2", s, 0.5, 0.6, 0.7, True) for s in range(3)] + [_record("bct", 0, 0.5, 0.6, 0.7, True)]
    records[0]["pairs"]["new/old"]["mAP"] = None  # NaN in JSON
    records[1]["pairs"]["new/old"]["mAP"] = float("nan")
    records[2]["pairs"]["new/old"]["mAP"] = 0.9
    for r in records[:3]:
        r["pairs"]["new/new"]["top1"] = None
    l2, bct = report.aggregate(records)
    assert (l2["method"], bct["method"]) == ("l2", "bct") and l2["seeds"] == 3
    assert l2["new/old.mAP"] == (pytest.approx(0.9), 0.0)  # one value left: std 0
    assert all(math.isnan(v) for v in l2["new/new.top1"])  # no value at all
    assert isinstance(l2["dim"], int) and isinstance(l2["passes"], int)
    assert report.aggregate([]) == []


# The report as the string-building renderer wrote it before DataFrame.to_markdown (only the claims' module name
# changed): same lines, cells and column alignment; tabulate pads the cells, which `content` ignores.
RENDERED_BEFORE = """\
# Benchmark results: grid `golden`

Regenerate with:

```bash
mixbct benchmark --grid golden
```

Golden grid.

Cross-test = new/old (new queries vs the old gallery); self-test = new/new. Mean ± sample std over seeds where a setting has several. Criterion: BCT's new/old > old/old and new/new > old/old on the gate metrics (top1, TAR@FAR=1e-3), per seed; update gain and retention on top1 vs the paragon.

**Incomplete: 2 cell(s) have no result yet.**

## open-class, old model softmax (weak), d = 128 (headline)

| method | seeds | self top1 | self mAP | self tar@far=1e-3 | cross top1 | cross mAP | cross tar@far=1e-3 | criterion | update gain | retention |
|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|
| old/old (reference) | 1 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | | | |
| bct | 1 | 0.7100 | 0.7100 | 0.7100 | 0.5200 | – | 0.5200 | pass (1/1) | – | – |
| l2 | 2 | 0.7500 ± 0.0000 | 0.7500 ± 0.0000 | 0.7500 ± 0.0000 | 0.5667 ± 0.0236 | 0.5667 ± 0.0236 | 0.5667 ± 0.0236 | pass (2/2) | 0.1905 ± 0.0673 | 0.8824 ± 0.0000 |
| mixbct | 3 | 0.7800 ± 0.0200 | 0.7800 ± 0.0200 | 0.7800 ± 0.0200 | 0.6100 ± 0.0100 | 0.6100 ± 0.0100 | 0.6100 ± 0.0100 | FAIL (2/3) | 0.2750 ± 0.0250 | 0.8667 ± 0.0222 |

## open-class, old model arcface (strong), d = 64

| method | seeds | self top1 | self mAP | self tar@far=1e-3 | cross top1 | cross mAP | cross tar@far=1e-3 | criterion | update gain | retention |
|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|
| old/old (reference) | 1 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | | | |
| none | 1 | 0.9000 | 0.9000 | 0.9000 | 0.0010 | 0.0010 | 0.0010 | FAIL (0/1) | -1.2475 | 1.0000 |

## open-class, old model softmax (weak), d = 128, ablation train.alpha=0.1

| method | seeds | self top1 | self mAP | self tar@far=1e-3 | cross top1 | cross mAP | cross tar@far=1e-3 | criterion | update gain | retention |
|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|
| old/old (reference) | 1 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | | | |
| mixbct | 1 | 0.7900 | 0.7900 | 0.7900 | 0.5800 | 0.5800 | 0.5800 | pass (1/1) | 0.2000 | 0.8778 |

## open-data, old model softmax (weak), d = 128

| method | seeds | self top1 | self mAP | self tar@far=1e-3 | cross top1 | cross mAP | cross tar@far=1e-3 | criterion | update gain | retention |
|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|
| old/old (reference) | 1 | 0.4000 | 0.4000 | 0.4000 | 0.4000 | 0.4000 | 0.4000 | | | |
| mixbct | 1 | 0.6000 | 0.6000 | 0.6000 | 0.3000 | 0.3000 | 0.3000 | FAIL (0/1) | -2.0000 | 1.3333 |

## Claims as found

Computed from the tables above by `components.benchmark_report.claims`.

- (a) MixBCT passes the criterion in every scenario: **does not hold**. 2 setting(s); fails in: open-class/softmax/d128, open-data/softmax/d128
- (b) weak old model: MixBCT cross-test ≥ BCT and ≥ L2: **holds**. open-class/d128: mixbct 0.6100 vs bct 0.5200; open-class/d128: mixbct 0.6100 vs l2 0.5667
- (c) MixBCT self-test ≥ L2: **holds**. open-class/softmax/d128: mixbct 0.7800 vs l2 0.7500

Figures: `cross_by_method.png` (headline cross-test top1), `tradeoff.png` (self vs cross top1).
"""


def test_report_content_is_what_the_string_building_renderer_wrote() -> None:
    records = [_record("mixbct", s, 0.5, 0.6 + s / 100, 0.8 - s / 50, s != 1, paragon=0.9) for s in range(3)]
    records += [_record("l2", s, 0.5, 0.55 + s / 30, 0.75, True, paragon=0.85) for s in range(2)]
    records += [_record("bct", 0, 0.5, 0.52, 0.71, True)]
    records[-1]["pairs"]["new/old"]["mAP"] = None
    records += [_record("mixbct", 0, 0.4, 0.3, 0.6, False, scenario="open-data", paragon=0.45),
                _record("mixbct", 0, 0.5, 0.58, 0.79, True, ablation="train.alpha=0.1", paragon=0.9),
                _record("none", 0, 0.5, 0.001, 0.9, False, old="arcface", dim=64, paragon=0.9)]  # fmt: skip
    grid = bm.Grid("golden", {}, (), description="Golden grid.\n")
    text = report.render(grid, report.aggregate(records), "mixbct benchmark --grid golden", missing=2)
    assert content(text) == content(RENDERED_BEFORE)
    assert "|:---" in text and "|---|" not in text  # tabulate's alignment rows (padded), not the hand-built ones


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


def test_a_baseline_near_the_paragon_is_reported_with_its_measured_reason() -> None:
    def rec(method: str, cross: float, terms: dict[str, tuple[float, float]] | None) -> dict:
        r = _record(method, 0, 0.9, cross, 0.95, cross > 0.9)
        r["pairs"]["paragon/old"] = {"top1": 0.002}
        if terms is not None:
            r["training"] = {"first": {"loss": 50.0, "cls": 40.0, **{k: a for k, (a, _) in terms.items()}},
                             "last": {"loss": 9.0, "cls": 4.0, **{k: b for k, (_, b) in terms.items()}}}  # fmt: skip
        return r

    records = [
        rec("bct", 0.93, {"influence": (9.0, 1.0)}),  # well above the paragon
        rec("nccl", 0.05, {"nccl": (4.0, 3.8)}),  # barely fell
        rec("lce", 0.03, {"boundary": (2.0, 0.1), "align": (1.0, 0.2)}),  # fell, yet near the paragon
        rec("advbct", 0.01, None),  # no history
        rec("mixbct", 0.95, {}),  # not a corrected baseline: not listed
    ]
    review = {r["method"]: r for r in report.baseline_review(records)}
    assert set(review) == {"bct", "nccl", "lce", "advbct"}
    assert review["bct"]["verdict"] == "well above" and review["bct"]["above"] == pytest.approx(0.928)
    assert review["nccl"]["verdict"] == "near the paragon"
    assert "not optimised away" in review["nccl"]["reason"] and "nccl 4 → 3.8 (barely fell, 95% left)" in review["nccl"]["reason"]
    assert "cls 40 → 4" in review["nccl"]["reason"]
    assert "was optimised, yet" in review["lce"]["reason"] and "boundary 2 → 0.1 (fell, 5% left)" in review["lce"]["reason"]
    assert review["advbct"]["reason"] == "no training history recorded for this cell"
    text = report.render(bm.Grid("hand", {}, ()), report.aggregate(records), "cmd", records=records)
    assert "## Corrected baselines against the paragon" in text
    cells = [line for line in content(text) if isinstance(line, list)]
    assert any(c[:3] == ["open-class/softmax/d128", "nccl", "0"] and c[6] == "near the paragon" for c in cells)


def test_choices_section_lists_fixed_choices_each_maps_weight_and_what_validation_picks_in_a_sweep() -> None:
    def val(cross: float, self_: float) -> dict:
        return {"validation": {"differences": {"new/old - old/old": {"top1": {"point": cross}},
                                               "new/new - old/old": {"top1": {"point": self_}}}}}  # fmt: skip

    lce = [dict(_record("lce", 0, 0.5, 0.6, 0.7, True), overrides=over, sets=val(c, s), id=f"lce-{i}")
           for i, (over, c, s) in enumerate([({}, -0.10, 0.02), ({"train.method_args.weight_scale": 16.0}, 0.03, 0.05),
                                             ({"train.method_args.weight_scale": 64.0}, 0.04, 0.025)])]  # fmt: skip
    slerp = dict(_record("slerp", 0, 0.5, 0.6, 0.7, True),
                 choice={"a": 0.3, "validation_score": 0.01, "validation_table": [{"a": 0.0, "score": 0.0},
                                                                                  {"a": 0.3, "score": 0.01}]})  # fmt: skip
    lines = report.choices_section([*lce, slerp, _record("mixbct", 0, 0.5, 0.6, 0.7, True)])
    text = "\n".join(lines)
    assert "## Hyper-parameters chosen on the validation split" in text
    assert "MixBCT α = 0.5" in text and "docs/select/results.md" in text and "docs/skip/results.md" in text
    # min(cross, self): ×16 scores +3.00, ×64 +2.50, the base −10.00 → ×16, in bold
    row = next(line for line in lines if line.startswith("| open-class/softmax/d128 | lce"))
    assert "grid base: -10.00" in row and "**weight_scale=16.0: +3.00**" in row and "weight_scale=64.0: +2.50" in row
    row = next(line for line in lines if "| slerp" in line)
    assert "| 0.3 | +1.00 | 0: +0.00 0.3: +1.00 |" in row
    assert not any("| mixbct" in line for line in lines)  # one cell: no sweep
