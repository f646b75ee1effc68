"""Data-parallel training with `torchrun` (torch.distributed): `runtime.nproc_per_node: N` (> 1).

How a stage trains on N processes:
1. The stage (`mixbct stage train`, the Prefect task, `dvc repro`) writes a spec of the training (the train section,
   the work folder, the role, the device settings) and launches
   `python -m torch.distributed.run --standalone --nproc_per_node N [runtime.torchrun_args] -m components.ddp_worker SPEC`.
2. Each worker joins the process group (gloo on the CPU, nccl on CUDA, one GPU per local rank), builds the same
   model from the same seed and runs `train.fit` wrapped in DistributedDataParallel: every global step's batch
   (params.yaml's batch_size, drawn by the same seeded permutation as a single-process run: the role of a
   DistributedSampler, with the global batch unchanged) is cut into N equal slices, one per rank; DDP averages the
   gradients, so the global batch and the learning-rate schedule stay those of params.yaml. MixBCT draws its
   replaced rows from a generator seeded per (seed, step, rank). Only rank 0 writes the checkpoint (every epoch,
   atomically); the others wait for it.
3. When the workers finish, the stage itself (one process: rank 0's role) resumes the finished checkpoint, which
   has nothing left to train, and goes on as usual: ONNX export, parity, history; MLflow logging happens later, in
   the register stage, once. A killed worker stops the whole group (torchrun's agent); the same command resumes from
   the last finished epoch.

What changes against one process, by construction: BatchNorm normalises each rank's slice (b / N rows; SyncBatchNorm,
`runtime.sync_batchnorm`, normalises the global batch, CUDA only), MixBCT picks floor(α·b/N) rows per rank, and
methods whose loss couples the rows of a batch (NCCL, AdvBCT's sets) see the rank's slice. Runtime settings are not
part of a model's key: a run on N processes resumes a single-process checkpoint and the reverse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from components.errors import ConfigError, UpgradeError

log = logging.getLogger(__name__)

WORKER = "components.ddp_worker"  # the module torchrun runs in each process
_SPEC_ENV = "MIXBCT_DDP_WORKER"  # set in the workers: the stage inside them trains and never launches again


@dataclass(frozen=True)
class Launch:
    """runtime.nproc_per_node / dist_backend / sync_batchnorm / torchrun_args, as pipeline.run sets them."""

    nproc_per_node: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on the CPU
    sync_batchnorm: bool = False
    torchrun_args: tuple[str, ...] = ()


_LAUNCH = Launch()


def set_launch(launch: Launch) -> None:
    global _LAUNCH
    _LAUNCH = launch


def current_launch() -> Launch:
    return _LAUNCH


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def rank() -> Rank:
    """This process's place in the process group (rank 0 of 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Rank()


def in_worker() -> bool:
    return os.environ.get(_SPEC_ENV) == "1"


def should_launch() -> bool:
    """True where a stage must hand its training to torchrun (nproc_per_node > 1, not already in a worker)."""
    return _LAUNCH.nproc_per_node > 1 and not in_worker()


def step_seed(seed: int, step: int, rank: int) -> int:
    """A generator seed per (seed, step, rank): every rank draws its own rows, and a resumed run draws the same."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def local_slice(batch_size: int, r: Rank) -> slice:
    """This rank's rows of a global batch of `batch_size` (equal slices; batch_size % world == 0)."""
    if batch_size % r.world:
        raise ConfigError(
            f"train.batch_size {batch_size} must divide into runtime.nproc_per_node = {r.world} equal slices"
        )
    per = batch_size // r.world
    return slice(r.rank * per, (r.rank + 1) * per)


def wrap(task: torch.nn.Module, device: torch.device, sync_batchnorm: bool) -> torch.nn.Module:
    """The task inside DistributedDataParallel (parameters and buffers broadcast from rank 0 here)."""
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("runtime.sync_batchnorm: SyncBatchNorm runs on CUDA only; turn it off on the CPU")
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(task)  # in place below the root (a task is never a BatchNorm)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(task, device_ids=ids)


def average(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value (epoch loss sums): every rank gets the same record."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def parameter_spread(module: torch.nn.Module) -> float:
    """max over parameters of (max over ranks − min over ranks): 0.0 when every rank holds the same weights, as
    DDP promises (buffers such as BatchNorm's running statistics are rank 0's in the checkpoint)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------- launcher side


def launch_training(spec: dict[str, Any], spec_path: Path) -> None:
    """Run the training described by `spec` on runtime.nproc_per_node processes and wait; raise if they fail."""
    from components.io import atomic_path

    spec_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(spec_path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(spec, indent=1))
    n = _LAUNCH.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    if not any(a.startswith(("--nnodes", "--rdzv", "--master")) for a in _LAUNCH.torchrun_args):
        cmd.append("--standalone")  # one node, rendezvous on localhost
    cmd += [*_LAUNCH.torchrun_args, "-m", WORKER, str(spec_path)]
    env = {**os.environ, _SPEC_ENV: "1", "PYTHONPATH": _pythonpath()}
    log.info("training on %d processes: %s", n, " ".join(cmd))
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise UpgradeError(
            f"distributed training failed (torchrun exited {done.returncode}; runtime.nproc_per_node = {n}). "
            f"Finished epochs are kept in {spec['checkpoint']}: run the same command again to resume"
        )


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")


# ------------------------------------------------------------------------------------------- worker side


@contextlib.contextmanager
def process_group(backend: str, device: str) -> Iterator[Rank]:
    """Join torchrun's process group (its env:// rendezvous) for the duration; CUDA: this rank's GPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    try:
        yield rank()
    finally:
        dist.destroy_process_group()
