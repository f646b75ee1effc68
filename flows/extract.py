"""Old-feature extraction mapped over shards on a Dask cluster, through Prefect's Dask task runner (prefect-dask).

`runtime.dask`: null (the default: the extract stage runs in the flow's own process, as `dvc repro` runs it),
`local` (a `distributed.LocalCluster` of `runtime.dask_workers` single-threaded worker processes, started and
stopped with the flow), or a scheduler's address (`tcp://scheduler:8786`: an existing cluster whose workers see
the work folder at the same path, e.g. a shared file system).

The legacy gallery, when the old model is trained here, is embedded the same way (`legacy_on_dask`). The shards
of the extract stage are the new training set's rows in whole batches (components.stages.extract_shards), each written
atomically by its worker; the assembly concatenates them in row order and computes MixBCT's credible mask, so the
result is bit-identical to single-process extraction (tests/flows/test_dask_extract.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped

from components import stages
from components.config import Config
from components.paths import Paths


def task_runner(cfg: Config) -> Any:
    from prefect_dask import DaskTaskRunner

    if cfg.runtime.dask == "local":
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runtime.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})  # fmt: skip
    return DaskTaskRunner(address=cfg.runtime.dask)


def extract_on_dask(cfg: Config, paths: Paths) -> dict[str, Any]:
    """The extract stage with its shards on `runtime.dask`'s cluster (a subflow with a Dask task runner)."""
    stages.extract_check(cfg.train.embedding_dim, paths, cfg.runtime.threads)  # before any worker starts
    shards = stages.extract_shards(cfg.extract, paths, cfg.extract.shard_rows)
    return _extract_flow.with_options(task_runner=task_runner(cfg))(cfg, paths, shards)


def legacy_on_dask(cfg: Config, paths: Paths) -> dict[str, Any]:
    """The legacy stage with the gallery embedded on `runtime.dask`'s cluster, when the old model is trained here (an
    imported gallery is never re-embedded): shards of whole batches, written atomically, assembled in row order."""
    import numpy as np

    from components import pipeline

    runner = task_runner(cfg)

    def on_dask(model: Any, images: Any, threads: int) -> np.ndarray:
        shards = stages.gallery_shards(len(images), cfg.extract.shard_rows)
        folder = Path(model).parent / "gallery.shards"  # inside the stage's temporary folder, removed with it
        done = _gallery_flow.with_options(task_runner=runner)(str(model), images, shards, str(folder))
        gallery = np.concatenate([np.load(p) for p in done])
        shutil.rmtree(folder)
        return gallery

    stages.set_gallery_extractor(on_dask)
    try:
        return pipeline.run("legacy", cfg, paths)
    finally:
        stages.set_gallery_extractor(None)


@flow(name="extract-legacy-gallery", log_prints=True)
def _gallery_flow(model: str, images: Any, shards: list[tuple[int, int]], folder: str) -> list[str]:
    shard = task(stages.embed_gallery_shard, name="embed-gallery-shard", retries=1, retry_delay_seconds=5)
    futures = shard.map(unmapped(model), unmapped(images), [a for a, _ in shards], [b for _, b in shards],
                        unmapped(folder), unmapped(1))  # fmt: skip
    done = [f.result() for f in futures]
    print(f"embedded the legacy gallery in {len(done)} shards")
    return done


@flow(name="extract-old-features", log_prints=True)
def _extract_flow(cfg: Config, paths: Paths, shards: list[tuple[int, int]]) -> dict[str, Any]:
    shard = task(stages.extract_shard, name="extract-shard", retries=1, retry_delay_seconds=5)
    futures = shard.map(unmapped(cfg.extract), unmapped(paths), [a for a, _ in shards], [b for _, b in shards],
                        unmapped(1))  # fmt: skip
    done = [f.result() for f in futures]
    print(f"extracted {len(done)} shards on {cfg.runtime.dask}")
    return task(stages.extract_assemble, name="assemble-old-features")(cfg.extract, paths, done)
