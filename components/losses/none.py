"""The paragon: ArcFace alone, no compatibility term (method.md, "Paragon").

The independent upper bound on self-test, and the model that must FAIL the compatibility criterion.
"""

from __future__ import annotations

import torch

from components.losses import CompatibilityMethod, NoArgs, register_method
from components.losses.arcface import ArcFaceHead


class Paragon(CompatibilityMethod):
    needs_old_features = False

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        loss = self.head(new, labels)
        return {"loss": loss, "cls": loss.detach()}


@register_method("none", args=NoArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: NoArgs) -> Paragon:
    return Paragon(embedding_dim, num_classes, s=s, m=m)
