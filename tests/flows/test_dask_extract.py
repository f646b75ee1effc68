"""Old-feature extraction on a 2-worker local Dask cluster through Prefect's task runner: bit-identical to the
single-process extract stage (issue "Past one process", item 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components import pipeline
from components.config import load_config
from components.paths import Paths


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_shards_on_two_dask_workers_assemble_to_the_single_process_result(params_factory, tmp_path: Path) -> None:
    from flows.extract import extract_on_dask

    single = Paths(tmp_path / "single")
    cfg = load_config(params_factory())
    for name in ("prepare", "legacy", "extract"):
        pipeline.run(name, cfg, single)
    dask = Paths(tmp_path / "dask")
    for folder in ("dataset", "legacy"):
        shutil.copytree(single.root / folder, dask.root / folder)
    # 7 rows per shard round up to one batch of 32: a shard per batch, on 2 single-threaded workers
    cfg = load_config(params_factory(runtime={"dask": "local", "dask_workers": 2},
                                     extract={"batch_size": 32, "shard_rows": 7}))  # fmt: skip
    ref = load_config(params_factory(extract={"batch_size": 32}))
    pipeline.run("extract", ref, single)  # the single-process reference at the same batch size
    summary = extract_on_dask(cfg, dask)
    for name in ("features.npy", "credible.npy", "summary.json"):
        assert (dask.old_features / name).read_bytes() == (single.old_features / name).read_bytes(), name
    from components.stages import extract_shards, split_arrays

    rows = len(split_arrays(single, "new_train")[1])
    assert summary["rows"] == rows and len(extract_shards(cfg.extract, single, 7)) == -(-rows // 32) > 2
    assert not (dask.root / "old_features.shards").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_legacy_gallery_on_two_dask_workers_is_the_single_process_embedding(params_factory, tmp_path: Path) -> None:
    """The legacy stage trains the old model and embeds the gallery in 3 shards on a 2-worker cluster: the same
    bytes as embedding that very model's gallery in one process, and no shard left behind."""
    import numpy as np

    from components.stages import _extract_gallery_here, split_arrays
    from flows.extract import legacy_on_dask

    cfg = load_config(params_factory(runtime={"dask": "local", "dask_workers": 2}, extract={"shard_rows": 512}))
    paths = Paths(tmp_path / "dask")
    pipeline.run("prepare", cfg, paths)
    images, _ = split_arrays(paths, "gallery")
    big = np.concatenate([np.arange(len(images))] * 30)  # a gallery of > 1,024 rows: 3 shards of whole batches
    info = legacy_on_dask(cfg, paths)
    assert info["origin"] == "trained"
    gallery = np.load(paths.legacy / "gallery.npy")
    here = _extract_gallery_here(paths.legacy / "model.onnx", images, 1)
    assert gallery.tobytes() == here.tobytes()
    assert not any(paths.legacy.rglob("gallery.shards"))
    # the shard path on a gallery larger than one shard, against one process, directly
    from components import stages
    from flows.extract import _gallery_flow, task_runner

    rows = images.subset(big)
    shards = stages.gallery_shards(len(rows), 512)
    assert len(shards) == 3 and shards[0] == (0, 512)
    done = _gallery_flow.with_options(task_runner=task_runner(cfg))(
        str(paths.legacy / "model.onnx"), rows, shards, str(tmp_path / "shards"))  # fmt: skip
    assert np.concatenate([np.load(p) for p in done]).tobytes() == _extract_gallery_here(
        paths.legacy / "model.onnx", rows, 1).tobytes()  # fmt: skip
