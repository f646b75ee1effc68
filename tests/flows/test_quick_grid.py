"""The committed `quick` grid (benchmarks/grid.yaml), run for real through the `benchmark` flow (~ 26 min).

Issue "The comparison the paper makes": the quick grid is exercised in a slow test. The checks are properties
of any sound run, not of particular numbers: every cell has a result, shared work exists once per key, a `none`
cell is its setting's paragon, the paragon is never compatible, compatible training moves the cross-test, and
the report covers every setting with the claims computed from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components import benchmark as bm
from components import benchmark_report as report

ROOT = Path(__file__).resolve().parents[2]


def check_quick_grid(root: Path, docs: Path, plans: list[bm.Plan]) -> None:
    """Assertions on a finished quick grid: its work folder `root` (…/quick) and its report folder `docs`."""
    records = {p.cell.id: json.loads(p.cell_json.read_text()) for p in plans}  # every cell has a result
    assert len(records) == len(plans)

    # shared work: one folder per distinct key; `none` cells train nothing of their own
    trained = {p.keys["new"] for p in plans if p.cfg.train.method != "none"}
    assert {d.name for d in (root / "shared/new").iterdir()} == trained
    assert {d.name for d in (root / "shared/paragon").iterdir()} == {p.keys["paragon"] for p in plans}
    assert {d.name for d in (root / "shared/legacy").iterdir()} == {p.keys["legacy"] for p in plans}

    for plan in plans:
        pairs = records[plan.cell.id]["pairs"]
        if plan.cfg.train.method == "none":  # its new model is the paragon itself
            assert pairs["new/new"] == pairs["paragon/paragon"] and pairs["new/old"] == pairs["paragon/old"]
        # method.md: the paragon "must FAIL compatibility" (an independent model's space is not the old one's)
        assert pairs["paragon/old"]["top1"] < pairs["old/old"]["top1"], plan.cell.id
        chance = 1 / plan.cfg.data.test_identities
        assert pairs["new/new"]["top1"] > 10 * chance, plan.cell.id  # every new model learned something
    for plan in plans:  # compatible training moves the cross-test above the paragon's in every setting
        if plan.cfg.train.method == "mixbct":
            pairs = records[plan.cell.id]["pairs"]
            assert pairs["new/old"]["top1"] > pairs["paragon/old"]["top1"], plan.cell.id

    text = (docs / "results.md").read_text()
    rows = report.aggregate(list(records.values()))
    settings = {report.setting_of(r) for r in rows}
    assert text.count("\n## ") == len(settings) + 1  # a section per setting + the claims
    assert "(headline)" in text and "ablation train.method_args.alpha=0.1" in text
    assert "ablation extract.credible_keep=1.0" in text
    for claim in report.claims(rows):  # the claims section states exactly what the numbers say
        verdict = {True: "**holds**", False: "**does not hold**", None: "**not measured**"}[claim["holds"]]
        assert f"{claim['claim']}: {verdict}" in text
    assert all(c["holds"] is not None for c in report.claims(rows))  # the quick grid measures all three claims
    assert (docs / "cross_by_method.png").stat().st_size > 0 and (docs / "tradeoff.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.long  # 18-30 min: kept out of CI's 45-minute budget (make test-long)
@pytest.mark.usefixtures("prefect_harness")
def test_quick_grid_runs_end_to_end(tmp_path: Path) -> None:
    from components.data.kanjivg import copy_source
    from flows.benchmark import benchmark

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    copy_source(tmp_path / "kanjivg")
    params["data"]["root"] = str(tmp_path / "kanjivg")
    params["registry"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "mlruns"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    work, docs = tmp_path / "benchmark", tmp_path / "docs"

    result = benchmark(grid="quick", params=str(tmp_path / "params.yaml"), workdir=str(work), report=str(docs),
                       grids_file=str(ROOT / "benchmarks/grid.yaml"))

    plans = bm.plan(bm.load_grid("quick", ROOT / "benchmarks/grid.yaml"), tmp_path / "params.yaml", work / "quick")
    assert result["cells"] == len(plans) and len(result["ran"]) == len(plans)
    check_quick_grid(work / "quick", docs, plans)
