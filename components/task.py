"""Training tasks: what one step computes. The loop only sees `task(batch) -> {"loss": ..., ...}`.

Backward compatibility lives here (through the method), never inside a backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from components.data.store import batches, chunks
from components.losses import CompatibilityMethod
from components.preprocess import Preprocess


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # [b, C, H, W] float: the backbone's preprocessed input
    labels: torch.Tensor  # [b] int64
    old: torch.Tensor | None = None  # [b, d] old-model features of the same images
    credible: torch.Tensor | None = None  # [b] bool


class TrainingTask(nn.Module):
    """What `train.fit` drives: `forward(batch) -> {"loss": ..., ...}` plus two hooks, no-ops unless a task needs
    them."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        raise NotImplementedError

    def prepare(self, old: Any, labels: torch.Tensor) -> None:
        """Dataset-level state, once before training (a resumed checkpoint then overrides it). `old`: the old
        features [N, d] as an array or a lazy row view (components.data.store.ArrayRows), or None."""

    def seed_step(self, seed: int) -> None:
        """Distributed training only: reseed the task's own random draws for this step and rank."""

    def on_epoch_start(self, epoch: int, epochs: int, images: Any, preprocess: Preprocess) -> None:
        """Called before each epoch with the training images (uint8 [N, H, W(, 3)], an array or a lazy
        components.data.store.Rows) and the preprocess that feeds the backbone."""


class CompatibleTask(TrainingTask):
    """New backbone + compatibility method (which owns the new classifier)."""

    def __init__(self, backbone: nn.Module, method: CompatibilityMethod) -> None:
        super().__init__()
        self.backbone = backbone
        self.method = method

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        skip = self.method.replaced_rows(batch.credible)
        if skip is None:
            new = self.backbone(batch.x)  # [b, d]
            return self.method(new, batch.labels, batch.old, batch.credible)
        # the backbone runs on the kept rows only; the skipped rows are placeholders the method replaces
        keep = torch.ones(len(batch.labels), dtype=torch.bool, device=batch.x.device)
        keep[skip] = False
        kept = self.backbone(batch.x[keep])  # [b - k, d]
        new = kept.new_zeros(len(keep), kept.shape[1]).index_put((torch.nonzero(keep).flatten(),), kept)
        return self.method(new, batch.labels, batch.old, batch.credible, rows=skip)

    def seed_step(self, seed: int) -> None:
        self.method.seed_step(seed)

    def prepare(self, old: Any, labels: torch.Tensor) -> None:
        if type(self.method).prepare is CompatibilityMethod.prepare:
            return  # no dataset-level state (MixBCT, L2, the paragon): the old features are not read whole
        self.method.prepare(torch.from_numpy(np.array(old, dtype=np.float32)) if old is not None else None, labels)

    def on_epoch_start(self, epoch: int, epochs: int, images: Any, preprocess: Preprocess) -> None:
        def embed_train() -> torch.Tensor:
            was_training = self.backbone.training
            self.backbone.eval()
            with torch.no_grad():
                device = next(self.backbone.parameters()).device  # the images come from the CPU
                out = torch.cat([self.backbone(x.to(device)) for x in batches(images, preprocess, chunks(len(images), 512))])
            self.backbone.train(was_training)
            return out  # [N, d]

        self.method.on_epoch_start(epoch, epochs, embed_train)


class ClassifierTask(TrainingTask):
    """Backbone + plain classification head: how the legacy (old) model is trained."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        loss = self.head(self.backbone(batch.x), batch.labels)
        return {"loss": loss, "cls": loss.detach()}
