"""The `benchmark` flow: the paper's comparison over a grid of cells, shared work computed once, resumable.

Wiring only: components.benchmark plans the cells and their shared folders, the stage table (components.pipeline)
does the work, components.registry logs one MLflow parent run with a child per cell. A cell whose `cell.json`
exists is skipped, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from components import benchmark as bm
from components import benchmark_report
from components import pipeline, registry, stages
from components.io import claim_workdir, exclusive, sweep_stale
from components.paths import BENCHMARK_LAYOUT


def _build(plan: bm.Plan, piece: str) -> None:
    """Run the stage that makes one shared piece, unless its folder already exists."""
    piece = bm.source_piece(plan, piece)
    if bm.is_built(plan, piece):
        return
    paths = bm.link_inputs(plan, piece)
    stage = bm.STAGE_OF[piece]
    method = f"-{plan.cfg.train.method}" if piece == "new" else ""
    task(pipeline.run, name=f"{stage}-{piece}-{plan.keys[piece][:8]}{method}")(stage, plan.cfg, paths)


@flow(name="benchmark", log_prints=True)
def benchmark(
    grid: str = "quick",
    params: str = "params.yaml",
    workdir: str = "artifacts/benchmark",
    report: str = "docs",
    grids_file: str = "benchmarks/grid.yaml",
) -> dict:
    """Run every cell of `grid` (a name in benchmarks/grid.yaml or a grid .yaml path), then report and log."""
    spec = bm.load_grid(grid, grids_file)
    root = Path(workdir) / spec.name
    plans = bm.plan(spec, params, root)  # every override validated before any work
    stages.set_threads(plans[0].cfg.runtime.threads)
    with exclusive(root, what="a benchmark"):
        claim_workdir(root, BENCHMARK_LAYOUT)  # a folder of the user's own files is refused, never written or swept
        sweep_stale(root)  # what a run killed mid-write left; never read as output
        todo = [p for p in plans if not bm.is_done(p)]
        print(f"grid {spec.name}: {len(plans)} cells, {len(plans) - len(todo)} done, {len(todo)} to run")
        for plan in todo:
            for piece in ("data", "legacy", "features", "paragon", "new"):
                if piece == "paragon" and not plan.cfg.train.paragon:
                    continue
                _build(plan, piece)
            paths = bm.link_cell(plan)
            task(pipeline.run, name=f"evaluate-{plan.cell.id}")("evaluate", plan.cfg, paths)
            task(bm.record_cell, name=f"record-{plan.cell.id}")(plan)
        records = benchmark_report.load_cells(plans)
        rows = benchmark_report.aggregate(records)
        command = f"mixbct benchmark --grid {grid} --params {params} --workdir {workdir} --report {report}"
        written = task(benchmark_report.write_report, name="report")(
            spec, rows, report, command, len(plans) - len(records), records
        )
    logged = task(registry.log_benchmark, name="log-mlflow", retries=2, retry_delay_seconds=5)(
        plans[0].cfg.registry, spec.name, records, written
    )
    create_markdown_artifact(Path(written["results"]).read_text(), key="benchmark-results", description=f"grid {spec.name}")
    return {"grid": spec.name, "cells": len(plans), "ran": [p.cell.id for p in todo], "report": written, "mlflow": logged}
