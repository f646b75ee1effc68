"""Benchmarks, measured side by side in one process and printed as ratios.

  python benchmarks/run.py step            MixBCT train step / paragon train step (same backbone, batch)
  python benchmarks/run.py flow            Prefect `upgrade` flow wall time / the same components called directly
  python benchmarks/run.py skip            scheduled re-run with nothing changed / the full upgrade (after make upgrade)

Targets (issue "The upgrade path, end to end"): step ratio <= 1.05, flow ratio <= 1.10 at the default size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flows.cli import OFFLINE_ENV  # noqa: E402

for key, value in {**OFFLINE_ENV, "MIXBCT_PROGRESS": "0"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))


def bench_step(threads: int, steps: int, batch: int) -> None:
    import torch

    from components.losses import build_method
    from components.models import build_backbone
    from components.task import Batch, CompatibleTask

    torch.set_num_threads(threads)
    d, classes = 128, 700
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 32, 32, generator=gen) * 2 - 1
    y = torch.randint(0, classes, (batch,), generator=gen)
    old = torch.randn(batch, d, generator=gen)
    credible = torch.rand(batch, generator=gen) < 0.9
    tasks = {}
    for name in ("mixbct", "none"):
        torch.manual_seed(0)  # same backbone initialisation for both
        backbone = build_backbone("resnet_small", d, 32)
        task = CompatibleTask(backbone, build_method(name, embedding_dim=d, num_classes=classes, seed=0))
        opt = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        tasks[name] = (task, backbone, opt)

    def step(name: str) -> float:
        task, backbone, opt = tasks[name]
        tic = time.perf_counter()
        loss = task(Batch(x, y, old, credible))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        opt.step()
        return time.perf_counter() - tic

    for name in tasks:  # warm-up
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {"mixbct": [], "none": []}
    for i in range(steps):  # interleaved, alternating order, so drift hits both equally
        order = ("mixbct", "none") if i % 2 == 0 else ("none", "mixbct")
        for name in order:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"train step, resnet_small, batch {batch}, {threads} threads, {steps} interleaved steps each")
    print(f"  paragon (none): {med['none'] * 1e3:8.1f} ms/step")
    print(f"  mixbct        : {med['mixbct'] * 1e3:8.1f} ms/step")
    print(f"  ratio mixbct / paragon = {med['mixbct'] / med['none']:.3f}  (target <= 1.05)")


def bench_flow(params: Path) -> None:
    """Same params, same components: once through Prefect, once called directly, each in a fresh work folder."""
    from components import registry, stages
    from components.config import load_config
    from components.paths import Paths
    from flows.upgrade import upgrade

    cfg = load_config(params)
    tmp = Path(tempfile.mkdtemp(prefix="mixbct-bench-"))

    def direct(work: Path) -> None:
        paths = Paths(work)
        stages.set_threads(cfg.train.threads)
        prepared = stages.prepare(cfg.data, paths)
        stages.legacy(cfg.legacy, cfg.old, cfg.data.image_size, paths, cfg.train.threads)
        stages.extract_old(cfg.extract, cfg.train.embedding_dim, cfg.data.image_size, paths, cfg.train.threads)
        stages.train(cfg.train, cfg.data.image_size, paths, "new")
        if cfg.train.paragon and cfg.train.method != "none":
            stages.train(cfg.train, cfg.data.image_size, paths, "paragon")
        stages.evaluate(cfg.evaluate, paths, cfg.train.threads)
        registry.track_and_register(cfg, paths, stages.fingerprint(cfg, prepared["data_hash"], paths))

    try:
        tic = time.perf_counter()
        direct(tmp / "direct")
        t_direct = time.perf_counter() - tic
        tic = time.perf_counter()
        upgrade(params=str(params), workdir=str(tmp / "flow"))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("step")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--batch", type=int, default=128)
    f = sub.add_parser("flow")
    f.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    k = sub.add_parser("skip")
    k.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()
    if args.bench == "step":
        bench_step(args.threads, args.steps, args.batch)
    elif args.bench == "skip":
        bench_skip(args.params)
    else:
        bench_flow(args.params)


if __name__ == "__main__":
    main()
