"""Data-parallel training with torchrun (components/distributed.py; issue "Past one process", item 2).

The slow test runs the real `mixbct stage train` with runtime.nproc_per_node = 2 (torchrun, gloo, one thread per
rank) on the tiny embedded upgrade: the ranks end with the same weights, the loss falls like the single-process
run's, and a run whose rank 1 is killed mid-training resumes from the last checkpoint to the very weights of an
uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from components import distributed
from components.errors import ConfigError
from components.losses import available_methods, build_method
from components.models import build_backbone
from components.task import Batch, CompatibleTask

ROOT = Path(__file__).resolve().parents[2]


def test_each_rank_gets_an_equal_slice_of_the_global_batch() -> None:
    slices = [distributed.local_slice(128, distributed.Rank(r, 4)) for r in range(4)]
    assert [list(range(128))[s] for s in slices] == [list(range(32 * r, 32 * (r + 1))) for r in range(4)]
    assert distributed.local_slice(128, distributed.Rank()) == slice(0, 128)
    with pytest.raises(ConfigError, match=r"train.batch_size 100 .*runtime.nproc_per_node = 3"):
        distributed.local_slice(100, distributed.Rank(0, 3))
    seeds = {distributed.step_seed(0, step, r) for step in range(500) for r in range(8)}
    assert len(seeds) == 500 * 8  # a stream of rows per (seed, step, rank)


def test_sync_batchnorm_is_refused_on_the_cpu_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="runtime.sync_batchnorm"):
        distributed.wrap(torch.nn.Linear(2, 2), torch.device("cpu"), sync_batchnorm=True)


def test_every_method_steps_under_ddp_without_unused_parameters(tmp_path: Path) -> None:
    """DDP (find_unused_parameters off) fails on the step after one in which a parameter got no gradient: two
    steps of every method inside a one-process gloo group show none has such a parameter."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        d, classes, b = 8, 6, 24
        x = torch.rand(b, 1, 16, 16, generator=g) * 2 - 1
        labels = torch.arange(b) % classes
        old = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
        for name in available_methods():
            torch.manual_seed(0)
            backbone = build_backbone("small_cnn", d, 16)
            method = build_method(name, embedding_dim=d, num_classes=classes, args={})
            if method.accepts_old_classifier:
                method.set_old_classifier(torch.randn(classes, d), torch.ones(classes, dtype=torch.bool))
            task = CompatibleTask(backbone, method)
            task.prepare(old.numpy(), labels)
            model = distributed.wrap(task, torch.device("cpu"), sync_batchnorm=False)
            opt = torch.optim.SGD(task.parameters(), lr=0.01)
            for step in range(2):
                task.seed_step(distributed.step_seed(0, step, 0))
                out = model(Batch(x, labels, old, torch.ones(b, dtype=torch.bool)))
                opt.zero_grad()
                out["loss"].backward()
                opt.step()
            assert torch.isfinite(out["loss"]), name
    finally:
        dist.destroy_process_group()


def _env(tmp: Path) -> dict[str, str]:
    from flows.cli import OFFLINE_ENV

    return {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(tmp / "prefect"), "MIXBCT_PROGRESS": "0",
            "PYTHONPATH": str(ROOT)}  # fmt: skip


def _stage(params: Path, work: Path, tmp: Path, *sets: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "stage", "train", "--params", str(params), "--workdir", str(work)]
    for s in sets:
        args += ["-S", s]
    return subprocess.Popen(args, cwd=ROOT, env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _history(work: Path) -> list[dict]:
    import json

    return json.loads((work / "new" / "history.json").read_text())


def _weights(work: Path) -> dict[str, torch.Tensor]:
    return torch.load(work / "new" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def _rank_pid(launcher: int, rank: str) -> int | None:
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "components.ddp_worker" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_two_gloo_processes_agree_learn_like_one_and_resume_after_a_killed_rank(params_factory, tmp_path: Path) -> None:
    from components import pipeline
    from components.config import load_config
    from components.paths import Paths

    epochs = 30  # 30 epochs x 7 steps of a global batch of 32 = 210 steps
    params = params_factory(train={"epochs": epochs, "batch_size": 32, "embedding_dim": 16})
    base = Paths(tmp_path / "base")
    cfg = load_config(params)
    for name in ("prepare", "legacy", "extract"):
        pipeline.run(name, cfg, base)
    works = {}
    for name in ("single", "ddp", "killed"):
        works[name] = tmp_path / name
        for folder in ("dataset", "legacy", "old_features"):
            shutil.copytree(base.root / folder, works[name] / folder)

    single = _stage(params, works["single"], tmp_path)
    assert single.wait(timeout=600) == 0, single.stdout.read()
    ddp = _stage(params, works["ddp"], tmp_path, "runtime.nproc_per_node=2")
    out = ddp.communicate(timeout=600)[0]
    assert ddp.returncode == 0, out
    one, two = _history(works["single"]), _history(works["ddp"])
    assert len(one) == len(two) == epochs
    # (1) the ranks hold the same parameters after every epoch
    assert all(r["processes"] == 2 and r["rank_spread"] == 0.0 for r in two)
    # (2) the loss falls like the single-process run's: every epoch within 10% of its first-epoch loss
    assert two[-1]["loss"] < 0.5 * two[0]["loss"]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True)) <= 0.1 * one[0]["loss"]

    # (3) kill rank 1 once a few epochs are checkpointed; the same command resumes to the same weights
    killed = _stage(params, works["killed"], tmp_path, "runtime.nproc_per_node=2")
    checkpoints = works["killed"] / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        done = [p for p in checkpoints.glob("new-*.pt")] if checkpoints.exists() else []
        if done and torch.load(done[0], weights_only=True)["epoch"] >= 5:
            break
        time.sleep(0.2)
    pid = _rank_pid(killed.pid, "1")
    assert pid is not None and killed.poll() is None, "the run ended before rank 1 could be killed"
    os.kill(pid, signal.SIGKILL)
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode != 0 and "distributed training failed" in out and "run the same command again" in out
    stopped_at = torch.load(next(checkpoints.glob("new-*.pt")), weights_only=True)["epoch"]
    assert 5 <= stopped_at < epochs
    again = _stage(params, works["killed"], tmp_path, "runtime.nproc_per_node=2")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert "resuming from" in out and f"{stopped_at} of {epochs} epochs done" in out
    assert [r["loss"] for r in _history(works["killed"])] == [r["loss"] for r in two]
    a, b = _weights(works["ddp"]), _weights(works["killed"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
