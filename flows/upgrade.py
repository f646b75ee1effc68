"""The `upgrade` flow: validate -> extract old features -> train -> evaluate -> register.

Wiring only: one task per stage of the table in components/pipeline.py, in its order; each hands the next one
paths and small summaries. `dvc repro` runs the same table stage by stage (dvc.yaml is generated from it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from components import pipeline, registry, stages
from components.config import load_config
from components.errors import UpgradeError
from components.io import claim_workdir, exclusive, sweep_stale
from components.paths import LAYOUT, Paths


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: an UpgradeError is bad input that fails the same way on every try."""
    error = state.data
    if not isinstance(error, BaseException):
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001  (unreadable result: keep Prefect's default, retry)
            return True
    return not isinstance(error, UpgradeError)


def _publish_reports(paths: Paths) -> None:
    for report in sorted(paths.reports.glob("*_validation.md")):
        key = report.stem.replace("_", "-")  # artifact keys: lowercase letters, digits, dashes
        create_markdown_artifact(report.read_text(), key=key, description=f"Great Expectations: {report.stem}")


@flow(name="upgrade", log_prints=True)
def upgrade(
    params: str = "params.yaml",
    workdir: str = "artifacts",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> dict:
    """Train a backward-compatible new model against the old gallery and register it if it passes the gate.

    When the params, the data and the old model are those of an already registered version, the run ends at
    once in a "nothing to upgrade" state (unless `force`).
    """
    cfg = load_config(params, overrides)
    paths = Paths(Path(workdir))
    hashes = task(stages.input_hashes, name="hash-inputs")(cfg)
    key = hashes["upgrade_key"]
    existing = task(registry.find_registered, name="find-registered", retries=2, retry_delay_seconds=5)(cfg.registry, key)
    if existing is not None and not force:
        print(f"nothing to upgrade: {existing['model_name']} version {existing['version']} was built from the same inputs")
        return {"status": "nothing-to-upgrade", "existing": existing, "workdir": str(paths.root)}
    out: dict[str, Any] = {}
    with exclusive(paths.root):  # a second run on the same work folder is refused, never interleaved
        claim_workdir(paths.root, LAYOUT)  # a folder of the user's own files is refused, never written or swept
        sweep_stale(paths.root)  # what a run killed mid-write left; never read as output
        try:
            for stage in pipeline.STAGES:  # the one definition of the pipeline (dvc.yaml is generated from it)
                if not stage.when(cfg):
                    continue
                options = {"retries": stage.retries, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_bad_input}
                if stage.name in ("legacy", "extract") and cfg.runtime.dask:  # shards on Dask (flows/extract.py)
                    from flows.extract import extract_on_dask, legacy_on_dask

                    out[stage.name] = (legacy_on_dask if stage.name == "legacy" else extract_on_dask)(cfg, paths)
                    continue
                out[stage.name] = task(pipeline.run, name=stage.name, **options)(stage.name, cfg, paths)
                if stage.name == "evaluate":
                    table = (paths.eval / "table.md").read_text()
                    print(table)
                    create_markdown_artifact(table, key="compatibility-table", description="cross-model table and gate verdict")
        finally:  # readable validation results, whether the suites passed or stopped the run
            _publish_reports(paths)
    registered = out["register"]
    verdict = (
        f"registered {registered['model_name']} version {registered['version']} as @{registered['alias']}"
        if registered.get("registered")
        else f"not registered: {registered.get('reason')}"
    )
    create_markdown_artifact(f"**Gate**: {verdict}", key="gate-verdict", description="registration decision")
    create_link_artifact(
        registry.run_url(cfg.registry, registered["experiment_id"], registered["run_id"]),
        key="mlflow-run",
        link_text=f"MLflow run {registered['run_id']}",
    )
    return {"status": "done", "evaluate": out["evaluate"], "register": registered, "workdir": str(paths.root)}
