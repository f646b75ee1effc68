"""The training loop: SGD, quadratic poly schedule, gradient clipping, a checkpoint every epoch, resume.

Recipe from method.md (authors' code): SGD momentum 0.9, weight decay 5e-4, lr_t = lr·(1 − t/T)², backbone
gradient norm clipped at 5, inputs scaled to [−1, 1]. Batches are drawn by a seeded permutation per epoch, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.augment import AUGMENTS, style_jitter
from components.data.store import Rows, batches
from components import distributed
from components.device import Placement, current_placement
from components.io import atomic_path
from components.preprocess import Preprocess, default_preprocess
from components.task import Batch, TrainingTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 5.0
    hflip: bool = False
    augment: str = "none"  # components.augment.AUGMENTS
    seed: int = 0


@dataclass(frozen=True)
class TrainArrays:
    """Everything a step reads. Images are a lazy view (components.data.store.Rows: each batch is read when it
    is needed) or an array; old features likewise (components.data.store.ArrayRows): a step reads only its own rows."""

    images: Rows | np.ndarray  # [N, H, W] or [N, H, W, 3] uint8
    labels: np.ndarray  # [N] int
    old: np.ndarray | Rows | None = None  # [N, d] float32 old features, dataset order (an array or a lazy ArrayRows)
    credible: np.ndarray | None = None  # [N] bool
    preprocess: Preprocess | None = None  # None: 1 channel at the images' own size, in [-1, 1]
    workers: int | None = None  # DataLoader processes reading batches ahead (None: components.data.store.loader_workers)


def poly_lr(base: float, step: int, total: int) -> float:
    """lr_t = lr · (1 − t/T)² (quadratic; the authors' code, although their README says linear)."""
    return base * (1.0 - step / total) ** 2


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def fit(
    task: TrainingTask,
    backbone: nn.Module,
    data: TrainArrays,
    cfg: LoopConfig,
    checkpoint: Path,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    placement: Placement | None = None,
) -> list[dict[str, Any]]:
    """Train `task` for cfg.epochs, resuming from `checkpoint` if it exists; returns the per-epoch history.

    `backbone` is the part of `task` whose gradient norm is clipped (method.md). `progress(step, total)` is
    called after every step. `placement` (default: the process's, from runtime.*; components/device.py) says on
    which device and in which precision; the task comes back on the CPU, in fp32, in its usual memory format.

    Inside a torchrun process group (components/distributed.py) each rank trains on its slice of every global
    batch under DistributedDataParallel; rank 0 alone writes the checkpoint.
    """
    pl = placement if placement is not None else current_placement()
    pl.module(task)
    if pl.compile:
        backbone.compile()  # in place: the state_dict keys stay the plain module's
    rk = distributed.rank()
    mine = distributed.local_slice(cfg.batch_size, rk)  # every row of the batch on one process
    images = data.images
    preprocess = data.preprocess if data.preprocess is not None else default_preprocess(int(images.shape[1]))
    labels = torch.from_numpy(data.labels.astype(np.int64))
    old_rows = data.old  # [N, d], possibly a lazy view: rows are read per step
    credible = torch.from_numpy(data.credible.astype(bool)) if data.credible is not None else None
    n = len(labels)
    steps_per_epoch = n // cfg.batch_size  # drop_last: every step sees b rows, so floor(α·b) is constant
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n} samples)")
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.SGD(task.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    task.prepare(old_rows, labels)  # dataset-level state of the method; a resumed checkpoint then overrides it
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        task.load_state_dict(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        history = [dict(h) for h in state["history"]]
        log.info("resuming from %s: %d of %d epochs done", checkpoint, start_epoch, cfg.epochs)
    scaler = pl.scaler()  # fp16 only; a pass-through otherwise
    flip_gen = torch.Generator().manual_seed(cfg.seed + 7)
    augment_gen = torch.Generator()
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {cfg.augment!r}")
    model = task
    if rk.world > 1 and start_epoch < cfg.epochs:
        model = distributed.wrap(task, pl.device, distributed.current_launch().sync_batchnorm)
    for epoch in range(start_epoch, cfg.epochs):
        task.on_epoch_start(epoch, cfg.epochs, images, preprocess)
        task.train()
        flip_gen.manual_seed(cfg.seed * 7919 + epoch)
        # per epoch: a resumed run draws the same maps; per rank: the ranks' slices get maps of their own
        augment_gen.manual_seed(cfg.seed * 7927 + epoch + 1_000_003 * rk.rank)
        order = _epoch_order(n, cfg.seed, epoch)
        global_steps = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
        steps = [idx[mine] for idx in global_steps]
        inputs = batches(images, preprocess, (idx.numpy() for idx in steps), workers=data.workers)
        sums: dict[str, float] = {}
        tic = time.perf_counter()
        for i, (idx, x) in enumerate(zip(steps, inputs, strict=True)):
            step = epoch * steps_per_epoch + i
            lr = poly_lr(cfg.lr, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if rk.world > 1:
                task.seed_step(distributed.step_seed(cfg.seed, step, rk.rank))
            if cfg.hflip:
                flip = (torch.rand(cfg.batch_size, generator=flip_gen) < 0.5)[mine]  # drawn for the global batch
                width = -1 if preprocess.layout == "nchw" else -2
                x = torch.where(flip[:, None, None, None], x.flip(width), x)
            if cfg.augment == "style":
                x = style_jitter(x, augment_gen, preprocess.layout)
            batch = Batch(
                x=pl.inputs(x),
                labels=labels[idx].to(pl.device),
                old=torch.from_numpy(np.asarray(old_rows[idx.numpy()], dtype=np.float32)).to(pl.device)
                if old_rows is not None else None,
                credible=credible[idx].to(pl.device) if credible is not None else None,
            )  # fmt: skip
            with pl.autocast():
                out = model(batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, step {i}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if progress is not None:
                progress(step + 1, total)
        record = distributed.average({k: v / steps_per_epoch for k, v in sums.items()}, pl.device)
        record.update(epoch=epoch + 1, lr=lr, seconds=time.perf_counter() - tic)
        if rk.world > 1:  # how many processes trained it, and whether their weights agree (0.0: they do)
            record.update(processes=rk.world, rank_spread=distributed.parameter_spread(task))
        history.append(record)
        if rk.main:
            with atomic_path(checkpoint, suffix=".pt") as tmp:
                torch.save(
                    {"task": task.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "history": history},
                    tmp,
                )  # fmt: skip
        distributed.barrier()  # no rank starts the next epoch before the checkpoint is whole
        if on_epoch is not None:
            on_epoch(record)
    if pl.compile:
        backbone._compiled_call_impl = None  # back to eager (nn.Module.compile's switch): export traces the module
    task.to("cpu", memory_format=torch.contiguous_format)  # export, parity and saving run on the CPU
    return history
