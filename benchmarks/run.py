"""Benchmarks, measured side by side in one process and printed as ratios.

  python benchmarks/run.py step            MixBCT train step / paragon train step (same backbone, batch)
  python benchmarks/run.py methods         every method's train-step time and peak memory / the paragon's
  python benchmarks/run.py flow            Prefect `upgrade` flow wall time / the same components called directly
  python benchmarks/run.py skip            scheduled re-run with nothing changed / the full upgrade (after make upgrade)
  python benchmarks/run.py stream          peak RSS of legacy -> extract -> train (1 epoch) at 10x the default image
                                           count / at 1x; end-to-end extraction throughput / model-only throughput
  python benchmarks/run.py flops           achieved training FLOP/s (torch's FLOP counter, one step) / a measured
                                           fp32 GEMM peak: compute-only variants side by side, then train.fit with
                                           data loading on the default images (after make upgrade)
  python benchmarks/run.py gallery         top-1 of old/old and new/old as 10^3..10^6 distractors join the old
                                           gallery; faiss IVF/HNSW against exact search at 10^6 rows (recall@1,
                                           queries/s), after make upgrade

Targets (issue "The upgrade path, end to end"): step ratio <= 1.05, flow ratio <= 1.10 at the default size;
(issue "Bring a real face system"): stream peak-RSS ratio <= 1.5, extraction throughput ratio >= 0.8;
(issue "Past one process"): skip_replaced step / paragon step <= 0.8; at 10^6 gallery rows an index with
recall@1 >= 0.99 against exact search and >= 10x its throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.cli import OFFLINE_ENV  # noqa: E402

for key, value in {**OFFLINE_ENV, "MIXBCT_PROGRESS": "0"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))


def bench_step(threads: int, steps: int, batch: int) -> None:
    """MixBCT against the paragon: the same measurement as `methods`, on a smaller classifier (700 classes), with
    params.yaml's alpha, and MixBCT with skip_replaced (the backbone runs on the kept rows only)."""
    import torch

    from components.config import load_config

    alpha = load_config(ROOT / "params.yaml").train.method_args["alpha"]
    classes, rows = 700, 7_000
    variants = {"none": ("none", {}), "mixbct": ("mixbct", {"alpha": alpha}),
                "mixbct skip": ("mixbct", {"alpha": alpha, "skip_replaced": True})}  # fmt: skip
    tasks = {k: _method_task(m, 128, classes, rows, threads, args) for k, (m, args) in variants.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 32, 32, generator=gen) * 2 - 1
    idx = torch.randint(0, rows, (batch,), generator=gen)
    med = _interleaved_medians(tasks, x, idx, steps)
    print(f"train step, resnet_small, batch {batch}, {threads} threads, {steps} interleaved steps each, alpha {alpha}")
    print(f"  paragon (none)            : {med['none'] * 1e3:8.1f} ms/step")
    print(f"  mixbct                    : {med['mixbct'] * 1e3:8.1f} ms/step")
    print(f"  mixbct, skip_replaced     : {med['mixbct skip'] * 1e3:8.1f} ms/step "
          f"(backbone on {batch - int(alpha * batch)} of {batch} rows)")
    print(f"  ratio mixbct / paragon = {med['mixbct'] / med['none']:.3f}  (target <= 1.05)")
    print(f"  ratio mixbct skip_replaced / paragon = {med['mixbct skip'] / med['none']:.3f}  (target <= 0.8)")
    skip_cross_test(ROOT / "artifacts" / "benchmark" / "skip-replaced")


def skip_cross_test(grid: Path) -> None:
    """The `skip-replaced` grid's two models (MixBCT with and without skip_replaced, default data and recipe,
    same seed): test-set top-1 of new/old and new/new with the 95% paired-bootstrap intervals of their gains over
    old/old, and whether each model's gains lie inside the other's intervals (the condition for the default)."""
    import json

    cells = {}
    for path in sorted((grid / "cells").glob("*/cell.json")) if (grid / "cells").is_dir() else []:
        cell = json.loads(path.read_text())
        args = cell["overrides"].get("train.method_args.skip_replaced", False)
        cells[bool(args)] = cell
    if len(cells) < 2:
        print(f"  (no finished skip-replaced grid in {grid}: run `mixbct benchmark --grid skip-replaced` for the "
              "cross-test of each)")
        return
    print(f"cross-test on the test set (skip-replaced grid, {grid}; gains over old/old in top-1 points, 95% CI):")
    rows = {}
    for skip, cell in sorted(cells.items()):
        gains = {side: cell["differences"][f"{pair} - old/old"]["top1"] for side, pair in (("cross", "new/old"),
                                                                                       ("self", "new/new"))}  # fmt: skip
        rows[skip] = gains
        print(f"  skip_replaced={str(skip):<5}  new/old {cell['pairs']['new/old']['top1']:.4f} "
              f"({100 * gains['cross']['point']:+.2f} [{100 * gains['cross']['lo']:+.2f}, {100 * gains['cross']['hi']:+.2f}])"
              f"  new/new {cell['pairs']['new/new']['top1']:.4f} ({100 * gains['self']['point']:+.2f} "
              f"[{100 * gains['self']['lo']:+.2f}, {100 * gains['self']['hi']:+.2f}])  gate {'passed' if cell['criterion']['passed'] else 'failed'}")
    inside = all(rows[a][side]["lo"] <= rows[b][side]["point"] <= rows[a][side]["hi"]
                 for a, b in ((False, True), (True, False)) for side in ("cross", "self"))  # fmt: skip
    print(f"  equal within the intervals (each model's gains inside the other's): {'yes' if inside else 'no'}")


def gemm_peak(threads: int, n: int = 2048, reps: int = 8) -> float:
    """Measured fp32 GEMM FLOP/s on this machine and thread count: the best of `reps` n×n @ n×n products."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def step_flops(task, backbone, opt, x, y, old, credible) -> int:
    """FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode (matmuls and
    convolutions; elementwise work is not counted, as is usual for model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _method_step(task, backbone, opt, x, y, old, credible)
    return int(counter.get_total_flops())


def bench_flops(threads: int, steps: int, batch: int, profile: bool) -> None:
    """Achieved training FLOP/s as a fraction of the measured fp32 GEMM peak, for the default recipe's step
    (resnet_small, MixBCT, 32×32 inputs, 3,150 classes) in several variants measured side by side, and for the real
    loop (train.fit on the stored default images: data loading included) when `make upgrade`'s dataset exists."""
    import torch

    from components.config import load_config

    alpha = load_config(ROOT / "params.yaml").train.method_args["alpha"]
    peak = gemm_peak(threads)
    print(f"fp32 GEMM peak (2048^3 torch.mm, best of 8, {threads} threads): {peak / 1e9:.1f} GFLOP/s")
    gen = torch.Generator().manual_seed(0)
    variants: dict[str, dict] = {}
    for name, b, layout, compiled in (("fp32, NCHW (default)", batch, "nchw", False),
                                      ("channels_last", batch, "nhwc", False),
                                      ("torch.compile", batch, "nchw", True),
                                      (f"batch {2 * batch}", 2 * batch, "nchw", False)):  # fmt: skip
        task, backbone, opt, old, labels, credible = _method_task(
            "mixbct", 128, DEFAULT_CLASSES, DEFAULT_ROWS, threads, {"alpha": alpha})  # fmt: skip
        x = torch.rand(b, 1, 32, 32, generator=gen) * 2 - 1
        idx = torch.randint(0, DEFAULT_ROWS, (b,), generator=gen)
        flops = step_flops(task, backbone, opt, x, labels[idx], old[idx], credible[idx])
        if layout == "nhwc":
            backbone.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if compiled:
            backbone.compile()  # what runtime.compile does in train.fit
        variants[name] = {"task": (task, backbone, opt, old, labels, credible), "x": x, "idx": idx, "flops": flops,
                          "batch": b}  # fmt: skip
    med = {}
    names = list(variants)
    for m in names:  # warm-up (and compilation) outside the timing
        v = variants[m]
        for _ in range(3):
            task, backbone, opt, old, labels, credible = v["task"]
            _method_step(task, backbone, opt, v["x"], labels[v["idx"]], old[v["idx"]], credible[v["idx"]])
    times: dict[str, list[float]] = {m: [] for m in names}
    for i in range(steps):
        for m in names[i % len(names):] + names[: i % len(names)]:
            v = variants[m]
            task, backbone, opt, old, labels, credible = v["task"]
            times[m].append(_timed(lambda: _method_step(task, backbone, opt, v["x"], labels[v["idx"]],
                                                        old[v["idx"]], credible[v["idx"]])))  # fmt: skip
    for m in names:
        med[m] = statistics.median(times[m])
    print(f"training step, compute only (batch in memory), {steps} interleaved steps each, {threads} threads:")
    print(f"  {'variant':<22} {'GFLOP/step':>10} {'ms/step':>8} {'GFLOP/s':>8} {'of peak':>8} {'images/s':>9}")
    for m in names:
        v = variants[m]
        rate = v["flops"] / med[m]
        print(f"  {m:<22} {v['flops'] / 1e9:10.2f} {med[m] * 1e3:8.1f} {rate / 1e9:8.1f} {rate / peak:8.3f} "
              f"{v['batch'] / med[m]:9.0f}")
    base = variants[names[0]]
    loop = _loop_step_seconds(threads, batch, alpha)
    if loop is not None:
        for workers, seconds in loop.items():
            rate = base["flops"] / seconds
            print(f"  train.fit, stored images, loader_workers={workers}: {seconds * 1e3:.1f} ms/step, "
                  f"{rate / 1e9:.1f} GFLOP/s = {rate / peak:.3f} of peak")
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        task, backbone, opt, old, labels, credible = base["task"]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                _method_step(task, backbone, opt, base["x"], labels[base["idx"]], old[base["idx"]],
                             credible[base["idx"]])  # fmt: skip
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def _loop_step_seconds(threads: int, batch: int, alpha: float, steps: int = 40) -> dict[int, float] | None:
    """Seconds per step of train.fit (one epoch of `steps` steps) on the stored default images, by loader
    workers; None without `make upgrade`'s dataset."""
    import torch

    from components.losses import build_method
    from components.models import build_backbone
    from components.paths import Paths
    from components.stages import split_arrays
    from components.task import CompatibleTask
    from components.train import LoopConfig, TrainArrays, fit

    paths = Paths(ROOT / "artifacts")
    if not paths.manifest.is_file():
        print("  (no artifacts/dataset: run `make upgrade` for the real loop's figure)")
        return None
    images, labels = split_arrays(paths, "new_train")
    n = steps * batch
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(labels), n, replace=False))
    y = np.unique(labels[keep], return_inverse=True)[1]
    out = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        backbone = build_backbone("resnet_small", 128, 32)
        task = CompatibleTask(backbone, build_method("mixbct", embedding_dim=128, num_classes=int(y.max()) + 1,
                                                     args={"alpha": alpha}))  # fmt: skip
        old = rng.standard_normal((n, 128)).astype(np.float32)
        data = TrainArrays(images.subset(keep), y, old, np.ones(n, dtype=bool), workers=workers)
        with tempfile.TemporaryDirectory() as tmp:
            history = fit(task, backbone, data, LoopConfig(epochs=1, batch_size=batch, lr=0.1), Path(tmp) / "ck.pt")
        out[workers] = history[0]["seconds"] / steps
    return out


# The default run's new-model training set: open-class, 3,150 new classes x 10 renderings (params.yaml).
DEFAULT_CLASSES, DEFAULT_ROWS, DEFAULT_EPOCHS = 3150, 31_500, 12


def _method_task(name: str, d: int, classes: int, rows: int, threads: int, args: dict | None = None):
    """A new backbone + method on a synthetic training set of `rows` (old features, labels, mask), prepared."""
    import torch

    from components.losses import build_method
    from components.models import build_backbone
    from components.task import CompatibleTask

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    old = torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=1)
    labels = torch.arange(rows) % classes
    credible = torch.rand(rows, generator=gen) < 0.9
    torch.manual_seed(0)  # same backbone initialisation for every method
    backbone = build_backbone("resnet_small", d, 32)
    task = CompatibleTask(backbone, build_method(name, embedding_dim=d, num_classes=classes, seed=0, args=args or {}))
    task.prepare(old, labels)
    opt = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return task, backbone, opt, old, labels, credible


def _method_step(task, backbone, opt, x, y, old, credible) -> None:
    import torch

    from components.task import Batch

    loss = task(Batch(x, y, old, credible))["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
    opt.step()


def _interleaved_medians(tasks: dict, x, idx, rounds: int) -> dict[str, float]:
    """Median seconds per train step of each task, steps run round-robin (order rotated every round, after 3
    warm-up steps each) so that drift on the machine hits every method alike."""
    names = list(tasks)

    def step(m: str) -> float:
        task, backbone, opt, old, labels, credible = tasks[m]
        tic = time.perf_counter()
        _method_step(task, backbone, opt, x, labels[idx], old[idx], credible[idx])
        return time.perf_counter() - tic

    for m in names:
        for _ in range(3):
            step(m)
    times: dict[str, list[float]] = {m: [] for m in names}
    for i in range(rounds):
        for m in names[i % len(names) :] + names[: i % len(names)]:
            times[m].append(step(m))
    return {m: statistics.median(v) for m, v in times.items()}


def method_peak_memory(name: str, threads: int, steps: int, batch: int) -> None:
    """Child process of `methods`: peak RSS growth (MiB) of `steps` train steps of one method, as JSON."""
    import gc
    import json
    import resource

    import psutil
    import torch

    task, backbone, opt, old, labels, credible = _method_task(name, 128, DEFAULT_CLASSES, DEFAULT_ROWS, threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 32, 32, generator=gen) * 2 - 1
    idx = torch.randint(0, DEFAULT_ROWS, (batch,), generator=gen)
    gc.collect()
    before = psutil.Process().memory_info().rss
    for _ in range(steps):
        _method_step(task, backbone, opt, x, labels[idx], old[idx], credible[idx])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"method": name, "step_peak_mib": max(peak - before, 0) / 2**20, "peak_rss_mib": peak / 2**20}))


def bench_methods(threads: int, steps: int, batch: int) -> None:
    """Every method against the paragon (`none`), in one run: step time interleaved, memory in child processes.

    Time: all methods' steps round-robin (order rotated every round), medians. Per-epoch work (UniBCT's prototype
    refinement embeds the whole training set) is timed over the 12 epochs of a default training on a
    default-size training set and amortised over its steps. Memory: each method in a fresh process; the growth of
    peak RSS over its train steps (parameters, optimizer state, activations, method state), so the common
    import cost does not dilute the ratio.
    """
    import json
    import subprocess

    import torch

    from components.losses import available_methods
    from components.preprocess import default_preprocess

    names = ["none"] + [m for m in available_methods() if m != "none"]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 32, 32, generator=gen) * 2 - 1
    idx = torch.randint(0, DEFAULT_ROWS, (batch,), generator=gen)
    tasks = {m: _method_task(m, 128, DEFAULT_CLASSES, DEFAULT_ROWS, threads) for m in names}
    images = torch.randint(0, 256, (DEFAULT_ROWS, 32, 32), dtype=torch.uint8, generator=gen)
    steps_total = DEFAULT_ROWS // batch * DEFAULT_EPOCHS
    hooks: dict[str, float] = {}  # seconds of per-epoch work over a whole default training
    for m, (task, *_rest) in tasks.items():
        tic = time.perf_counter()
        for epoch in range(DEFAULT_EPOCHS):
            task.on_epoch_start(epoch, DEFAULT_EPOCHS, images, default_preprocess(32))
        hooks[m] = time.perf_counter() - tic
    step_s = _interleaved_medians(tasks, x, idx, steps)
    memory = {}
    for m in names:
        out = subprocess.run(
            [sys.executable, __file__, "method-memory", "--method", m, "--threads", str(threads), "--batch", str(batch)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        memory[m] = json.loads(out.strip().splitlines()[-1])
    total = {m: step_s[m] + hooks[m] / steps_total for m in names}
    base_t, base_m = total["none"], memory["none"]["step_peak_mib"]
    print(f"train step per method, resnet_small, d=128, {DEFAULT_CLASSES} classes, batch {batch}, {threads} threads, "
          f"{steps} interleaved rounds; per-epoch work amortised over a {DEFAULT_EPOCHS}-epoch training ({steps_total} steps)")  # fmt: skip
    print(f"  {'method':<12} {'step ms':>8} {'+epochs ms':>10} {'time ratio':>10} {'peak MiB':>9} {'mem ratio':>9}")
    for m in names:
        mem = memory[m]["step_peak_mib"]
        print(f"  {m:<12} {step_s[m] * 1e3:8.1f} {hooks[m] / steps_total * 1e3:10.2f} "
              f"{total[m] / base_t:10.3f} {mem:9.1f} {mem / base_m:9.3f}")  # fmt: skip
    print(f"  MixBCT / paragon: time {total['mixbct'] / base_t:.3f} (target <= 1.05), "
          f"peak memory {memory['mixbct']['step_peak_mib'] / base_m:.3f}")


def bench_flow(params: Path) -> None:
    """Same params, same components: once through Prefect, once called directly, each in a fresh work folder."""
    from components import pipeline, stages
    from components.config import load_config
    from components.paths import Paths
    from flows.upgrade import upgrade

    cfg = load_config(params)
    tmp = Path(tempfile.mkdtemp(prefix="mixbct-bench-"))

    def direct(work: Path) -> None:
        paths = Paths(work)
        stages.input_hashes(cfg)  # as the flow: hash the inputs first
        for stage in pipeline.STAGES:  # the same table the flow iterates
            if stage.when(cfg):
                pipeline.run(stage.name, cfg, paths)

    try:
        tic = time.perf_counter()
        direct(tmp / "direct")
        t_direct = time.perf_counter() - tic
        tic = time.perf_counter()
        upgrade(params=str(params), workdir=str(tmp / "flow"), force=True)  # a full run even if these inputs are registered
        t_flow = time.perf_counter() - tic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"upgrade with {params}")
    print(f"  components called directly: {t_direct:8.1f} s")
    print(f"  Prefect flow `upgrade`    : {t_flow:8.1f} s (includes the ephemeral API server start)")
    print(f"  ratio flow / direct = {t_flow / t_direct:.3f}  (target <= 1.10)")


def bench_skip(params: Path) -> None:
    """A scheduled re-run with nothing changed, against the full upgrade that registered the same inputs.

    Run after `make upgrade` registered a version: the full time is that run's `upgrade.wall_seconds` metric
    (flow start to registration); the re-run is timed here end to end, Prefect server start included.
    """
    from mlflow import MlflowClient

    from components.config import load_config
    from components.registry import connect
    from flows.upgrade import upgrade

    tic = time.perf_counter()
    result = upgrade(params=str(params), workdir=str(ROOT / "artifacts"))
    t_skip = time.perf_counter() - tic
    if result["status"] != "nothing-to-upgrade":
        print("inputs differ from every registered version: the run trained (run `make upgrade` first)")
        return
    connect(load_config(params).registry)
    full = MlflowClient().get_run(result["existing"]["run_id"]).data.metrics.get("upgrade.wall_seconds")
    if full is None:
        print(f"scheduled re-run with nothing changed: {t_skip:.1f} s (the registered run predates upgrade.wall_seconds)")
        return
    print(f"scheduled re-run with nothing changed: {t_skip:.1f} s; full upgrade (version "
          f"{result['existing']['version']}): {full:.1f} s")
    print(f"  ratio re-run / full upgrade = {t_skip / full:.3f}  (target <= 0.05)")


STREAM_STAGES = ("legacy", "extract", "train")


def _stream_overrides(scale: int, threads: int) -> dict:
    """The default data with `scale` x the training renderings per identity; one epoch each, no paragon."""
    return {"data.samples_per_identity": 10 * scale, "legacy.epochs": 1, "train.epochs": 1, "train.paragon": False,
            "runtime.threads": threads, "runtime.workers": threads}  # fmt: skip


def stream_child(work: Path, scale: int, threads: int, stage_set: str) -> None:
    """Child of `stream`: run the prepare stage, or legacy -> extract -> train (1 epoch), in this process."""
    import resource

    from components import pipeline
    from components.config import load_config
    from components.paths import Paths

    cfg = load_config(ROOT / "params.yaml", _stream_overrides(scale, threads))
    names = ("prepare",) if stage_set == "prepare" else STREAM_STAGES
    tic = time.perf_counter()
    for name in names:
        pipeline.run(name, cfg, Paths(work))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - tic, "peak_mib": peak, "children_peak_mib": workers}))


def bench_stream(threads: int, scale: int, keep: Path | None) -> None:
    """Peak RSS of legacy -> extract -> train (1 epoch) at the default image count and at `scale` x it, each in a
    fresh process (the prepare stage, which renders the images, runs before in its own process); then end-to-end
    extraction throughput (stored images read per batch, preprocessed, run through the old ONNX model) against
    the model alone on the same batches already in memory as float tensors, interleaved."""
    import subprocess

    tmp = keep or Path(tempfile.mkdtemp(prefix="mixbct-stream-"))
    rows: dict[int, dict] = {}
    try:
        for k in (1, scale):
            work = tmp / f"x{k}"
            for stage_set in ("prepare", "train"):
                shutil.rmtree(work / "checkpoints", ignore_errors=True)  # a kept folder's finished runs are not reused
                out = subprocess.run([sys.executable, __file__, "stream-child", "--work", str(work), "--scale", str(k),
                                      "--threads", str(threads), "--stages", stage_set],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                if stage_set == "train":
                    rows[k] = json.loads(out.stdout.strip().splitlines()[-1])
            images = np.load(work / "dataset" / "images.npy", mmap_mode="r")
            rows[k]["images"] = int(images.shape[0])
        base, big = rows[1], rows[scale]
        print(f"legacy -> extract -> train (1 epoch), default params, {threads} threads, each in a fresh process:")
        for k in (1, scale):
            r = rows[k]
            print(f"  {k:>3} x images ({r['images']:>8,} stored): peak RSS {r['peak_mib']:8.1f} MiB "
                  f"(DataLoader workers {r['children_peak_mib']:.1f} MiB), {r['seconds']:7.1f} s")
        print(f"  ratio peak RSS {scale}x / 1x = {big['peak_mib'] / base['peak_mib']:.3f}  (target <= 1.5)")
        _stream_throughput(tmp / "x1", threads)
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _stream_throughput(work: Path, threads: int, rounds: int = 5) -> None:
    import torch

    from components.data.store import batches, chunks
    from components.embed import load_embedder
    from components.paths import Paths
    from components.stages import old_model_path, split_arrays

    torch.set_num_threads(threads)
    paths = Paths(work)
    model = load_embedder(old_model_path(paths), threads=threads)
    images, _ = split_arrays(paths, "new_train")
    order = chunks(min(len(images), 20_000), 512)
    tensors = [model.preprocess.array(np.asarray(images[c])) for c in order]  # the model-only side: in memory
    n = sum(len(c) for c in order)
    e2e, only = [], []
    for _ in range(rounds):
        tic = time.perf_counter()
        for x in batches(images, model.preprocess, order):
            model(x.numpy())
        e2e.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        for x in tensors:
            model(x)
        only.append(time.perf_counter() - tic)
    t_e2e, t_only = statistics.median(e2e), statistics.median(only)
    print(f"old-model extraction, {n:,} stored images, batch 512, median of {rounds} interleaved rounds:")
    print(f"  model only (float tensors in memory): {n / t_only:9.0f} images/s")
    print(f"  end to end (read + preprocess + model): {n / t_e2e:7.0f} images/s")
    print(f"  ratio end-to-end / model-only throughput = {t_only / t_e2e:.3f}  (target >= 0.8)")


GALLERY_SIZES = (1_000, 10_000, 100_000, 1_000_000)
# (factory, search parameters) tried at the largest size: IVF at two list counts over a range of nprobe, HNSW over
# efSearch; the best setting that keeps recall@1 >= 0.99 is reported against exact search's throughput.
# Each factory is built once, then searched with each of its settings (faiss ParameterSpace syntax).
ANN_SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("IVF1024,Flat", tuple(f"nprobe={p}" for p in (8, 16, 32, 64))),
    ("IVF4096,Flat", tuple(f"nprobe={p}" for p in (16, 32, 64, 128))),
    ("IVF16384,Flat", tuple(f"nprobe={p}" for p in (32, 64, 128, 256))),
    ("HNSW32", tuple(f"efSearch={e}" for e in (32, 64, 128, 256))),
)
TRAIN_PER_LIST = 39  # faiss's advice: at least 39 training points per IVF list


def _render_distractors(args: tuple[list[str], int, int, int]) -> np.ndarray:
    from components.data.kanjivg import render_samples

    sources, seed, per_identity, size = args
    return np.concatenate([render_samples(Path(s), seed, range(per_identity), size) for s in sources])


def _distractors(work: Path, out: Path, rows: int, threads: int) -> np.ndarray:
    """[rows, d] float32 old-model embeddings of renderings of the TRAINING identities (none is a test identity, so
    any of them ranked first is a wrong answer), drawn with another seed than the dataset's renderings; written
    once to `out` (kept with --keep) and memory-mapped."""
    import concurrent.futures as cf

    from components.data.store import ArrayWriter
    from components.embed import extract
    from components.paths import Paths
    from components.stages import load_manifest, old_embedder

    paths = Paths(work)
    if out.is_file():
        existing = np.load(out, mmap_mode="r")
        if existing.shape[0] >= rows:
            return existing
    manifest = load_manifest(paths, ("source", "split", "identity"))
    test = set(manifest.loc[~manifest["split"].isin(("new_train", "old_train")), "identity"])
    train = manifest[manifest["split"].isin(("new_train", "old_train")) & ~manifest["identity"].isin(test)]
    sources = sorted(train.groupby("identity")["source"].first())
    per = -(-rows // len(sources))  # renderings per identity
    size = int(np.load(paths.images, mmap_mode="r").shape[1])
    model = old_embedder(paths, threads=threads)
    groups = [sources[i : i + 16] for i in range(0, len(sources), 16)]
    seed = 1_000_003  # not the dataset's seed: other renderings than any the models were trained on
    tmp = out.with_suffix(".tmp.npy")
    done = 0
    tic = time.perf_counter()
    with ArrayWriter(tmp, (len(sources) * per, model.dim), np.float32) as writer, \
            cf.ProcessPoolExecutor(max_workers=threads) as pool:  # fmt: skip
        for images in pool.map(_render_distractors, [(g, seed, per, size) for g in groups]):
            writer.write_block(done, extract(model, images, batch_size=1024))
            done += len(images)
    os.replace(tmp, out)
    print(f"  rendered and embedded {done:,} distractors ({len(sources):,} training identities x {per}) "
          f"in {time.perf_counter() - tic:.0f} s")
    return np.load(out, mmap_mode="r")


def _top1(xq: np.ndarray, yq: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> float:
    from components.ann import build_index, timed_search

    _, rows, _ = timed_search(build_index(xb), xq, 1)
    return float((yb[rows[:, 0]] == yq).mean())


def bench_gallery(work: Path, threads: int, rows: int, keep: Path | None) -> None:
    """A MegaFace-style identification curve (top-1 of old/old and new/old as distractors join the old gallery)
    and, at the largest gallery, approximate indexes against exact search, side by side in this process."""
    import faiss
    import torch

    from components.ann import (TRAIN_ROWS, GalleryTooSmall, build_index, compare_with_exact, exact_search,
                                set_search_params)
    from components.embed import extract, load_embedder
    from components.evaluate import _normalized
    from components.paths import Paths
    from components.stages import gallery_path, old_embedder, split_arrays

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    paths = Paths(work)
    if not (paths.model_dir("new") / "model.onnx").is_file():
        sys.exit(f"{work}: no finished upgrade here (run `make upgrade` first, or pass --work)")
    tmp = keep or Path(tempfile.mkdtemp(prefix="mixbct-gallery-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        distractors = _distractors(work, tmp / "distractors.npy", rows, threads)
        images, yq = split_arrays(paths, "query")
        _, yg = split_arrays(paths, "gallery")
        old, new = old_embedder(paths, threads=threads), load_embedder(paths.model_dir("new") / "model.onnx", threads=threads)
        q = {"old": _normalized(extract(old, images), "queries"), "new": _normalized(extract(new, images), "queries")}
        gallery = _normalized(np.load(gallery_path(paths)), "gallery")
        print(f"identification with distractors: {len(yq):,} queries, {len(yg):,} gallery identities + distractors "
              f"(old-model embeddings of training identities), exact search, {threads} threads:")
        print(f"  {'distractors':>12}  {'old/old top1':>12}  {'new/old top1':>12}")
        rows = min(rows, len(distractors))
        for n in [s for s in GALLERY_SIZES if s < rows] + [rows]:
            xb = np.concatenate([gallery, _normalized(distractors[:n], "distractors")])
            yb = np.concatenate([yg, np.full(n, -1, dtype=yg.dtype)])
            print(f"  {n:>12,}  {_top1(q['old'], yq, xb, yb):12.4f}  {_top1(q['new'], yq, xb, yb):12.4f}")
        from components.evaluate import tar_name, verification_metrics, verification_pairs

        tic = time.perf_counter()
        tars = {m: verification_metrics(q[m], yq, xb, yb, fars=(1e-4, 1e-3))[0] for m in ("old", "new")}
        print(f"verification at {len(xb):,} gallery rows ({time.perf_counter() - tic:.1f} s for both pairs): "
              f"{verification_pairs(yq, yb)['text']}")
        for f in (1e-4, 1e-3):
            print(f"  TAR@FAR={f:g}: old/old {tars['old'][tar_name(f)]:.4f}, new/old {tars['new'][tar_name(f)]:.4f}")
        print(f"approximate search at {len(xb):,} rows x {xb.shape[1]}-d (new queries against the old gallery "
              f"+ distractors), recall@1 against exact search on the same {len(yq):,} queries:")
        print(f"  {'index':<14} {'search':<13} {'build s':>8} {'recall@1':>9} {'queries/s':>10} {'x exact':>8}")
        exact = exact_search(q["new"], xb)
        exact = min([exact] + [exact_search(q["new"], xb) for _ in range(2)], key=lambda e: e[2])  # best of 3
        print(f"  exact (IndexFlatIP, BLAS): {len(yq) / exact[2]:,.0f} queries/s (best of 3)")
        best = None
        for factory, settings in ANN_SETTINGS:
            lists = int(factory.split(",")[0][3:]) if factory.startswith("IVF") else 0
            tic = time.perf_counter()
            try:
                index = build_index(xb, factory, train_rows=max(TRAIN_ROWS, TRAIN_PER_LIST * lists))
            except GalleryTooSmall:
                print(f"  {factory:<14} (too few rows to train)")
                continue
            built = time.perf_counter() - tic
            for params in settings:
                set_search_params(index, factory, params)
                report = compare_with_exact(index, q["new"], xb, factory, params, exact=exact)
                print(f"  {factory:<14} {params:<13} {built:8.1f} {report.recall_at_1:9.4f} {report.qps:10.0f} "
                      f"{report.speedup:8.1f}")
                if report.recall_at_1 >= 0.99 and (best is None or report.speedup > best.speedup):
                    best = report
            del index
        if best is None:
            print("  no setting reached recall@1 >= 0.99 (see the trade-off above)")
        else:
            print(f"  best with recall@1 >= 0.99: {best.factory} {best.params}: {best.qps:.0f} vs exact "
                  f"{best.exact_qps:.0f} queries/s = {best.speedup:.1f}x  (target >= 10x)")
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("step")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--batch", type=int, default=128)
    ms = sub.add_parser("methods")
    ms.add_argument("--threads", type=int, default=2)
    ms.add_argument("--steps", type=int, default=50)
    ms.add_argument("--batch", type=int, default=128)
    mm = sub.add_parser("method-memory")  # child process of `methods`
    mm.add_argument("--method", required=True)
    mm.add_argument("--threads", type=int, default=2)
    mm.add_argument("--steps", type=int, default=5)
    mm.add_argument("--batch", type=int, default=128)
    f = sub.add_parser("flow")
    f.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    st = sub.add_parser("stream")
    st.add_argument("--threads", type=int, default=2)
    st.add_argument("--scale", type=int, default=10)
    st.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder, removed)")
    sc = sub.add_parser("stream-child")  # child process of `stream`
    sc.add_argument("--work", type=Path, required=True)
    sc.add_argument("--scale", type=int, required=True)
    sc.add_argument("--threads", type=int, default=2)
    sc.add_argument("--stages", choices=["prepare", "train"], required=True)
    k = sub.add_parser("skip")
    k.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    fl = sub.add_parser("flops")
    fl.add_argument("--threads", type=int, default=2)
    fl.add_argument("--steps", type=int, default=20)
    fl.add_argument("--batch", type=int, default=128)
    fl.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    g = sub.add_parser("gallery")
    g.add_argument("--work", type=Path, default=ROOT / "artifacts", help="a finished upgrade's work folder")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--rows", type=int, default=1_000_000, help="distractor rows (the curve stops at this size)")
    g.add_argument("--keep", type=Path, default=None, help="folder keeping the rendered distractors between runs")
    args = parser.parse_args()
    if args.bench == "step":
        bench_step(args.threads, args.steps, args.batch)
    elif args.bench == "methods":
        bench_methods(args.threads, args.steps, args.batch)
    elif args.bench == "method-memory":
        method_peak_memory(args.method, args.threads, args.steps, args.batch)
    elif args.bench == "skip":
        bench_skip(args.params)
    elif args.bench == "stream":
        bench_stream(args.threads, args.scale, args.keep)
    elif args.bench == "stream-child":
        stream_child(args.work, args.scale, args.threads, args.stages)
    elif args.bench == "flops":
        bench_flops(args.threads, args.steps, args.batch, args.profile)
    elif args.bench == "gallery":
        bench_gallery(args.work, args.threads, args.rows, args.keep)
    else:
        bench_flow(args.params)


if __name__ == "__main__":
    main()
