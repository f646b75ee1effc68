"""Training tasks: what one step computes. The loop only sees `task(batch) -> {"loss": ..., ...}`.

Backward compatibility lives here (through the method), never inside a backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from components.losses import CompatibilityMethod


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # [b, 1, H, W] float in [-1, 1]
    labels: torch.Tensor  # [b] int64
    old: torch.Tensor | None = None  # [b, d] old-model features of the same images
    credible: torch.Tensor | None = None  # [b] bool


class CompatibleTask(nn.Module):
    """New backbone + compatibility method (which owns the new classifier)."""

    def __init__(self, backbone: nn.Module, method: CompatibilityMethod) -> None:
        super().__init__()
        self.backbone = backbone
        self.method = method

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        new = self.backbone(batch.x)  # [b, d]
        return self.method(new, batch.labels, batch.old, batch.credible)


class ClassifierTask(nn.Module):
    """Backbone + plain classification head: how the legacy (old) model is trained."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        loss = self.head(self.backbone(batch.x), batch.labels)
        return {"loss": loss, "cls": loss.detach()}
