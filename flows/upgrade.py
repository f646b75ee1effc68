"""The `upgrade` flow: validate -> extract old features -> train -> evaluate -> register.

Wiring only: each task is a component function (components.stages / components.registry) that hands the next
one paths and small summaries. `dvc repro` runs the same functions stage by stage (dvc.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task

from components import registry, stages
from components.config import load_config
from components.paths import Paths


@flow(name="upgrade", log_prints=True)
def upgrade(params: str = "params.yaml", workdir: str = "artifacts", overrides: dict[str, Any] | None = None) -> dict:
    """Train a backward-compatible new model against the old gallery and register it if it passes the gate."""
    cfg = load_config(params, overrides)
    paths = Paths(Path(workdir))
    stages.set_threads(cfg.train.threads)
    prepared = task(stages.prepare, name="validate-and-prepare-data")(cfg.data, paths)
    task(stages.legacy, name="legacy-system")(cfg.legacy, cfg.old, cfg.data.image_size, paths, cfg.train.threads)
    task(stages.extract_old, name="extract-old-features")(
        cfg.extract, cfg.train.embedding_dim, cfg.data.image_size, paths, cfg.train.threads
    )
    task(stages.train, name="train-new")(cfg.train, cfg.data.image_size, paths, "new")
    if cfg.train.paragon and cfg.train.method != "none":
        task(stages.train, name="train-paragon")(cfg.train, cfg.data.image_size, paths, "paragon")
    evaluated = task(stages.evaluate, name="evaluate")(cfg.evaluate, paths, cfg.train.threads)
    print((paths.eval / "table.md").read_text())
    registered = task(registry.track_and_register, name="register", retries=2, retry_delay_seconds=5)(
        cfg, paths, stages.fingerprint(cfg, prepared["data_hash"], paths)
    )
    return {"evaluate": evaluated, "register": registered, "workdir": str(paths.root)}
