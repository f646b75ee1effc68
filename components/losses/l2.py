"""L2 baseline: L_cls + 10 · mean ‖norm(old_i) − norm(new_i)‖₂ (method.md, "Baselines").

Feature regression onto the old model, the simplest compatibility term: the "L2" baseline of MixBCT's
comparison (Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training", arXiv:2308.06948,
2023), weight and unsquared distance as in the authors' baseline code; the feature-distance alternative that
BCT (Shen et al., CVPR 2020, arXiv:2003.11942) argues against.

Shapes: new [b, d] (grad), old [b, d] frozen old features of the same images, labels [b].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method
from components.losses.arcface import ArcFaceHead


class L2Args(MethodArgs):
    weight: float = Field(10.0, ge=0)  # method.md: L_cls + 10 · mean ‖norm(old_i) − norm(new_i)‖₂


def feature_distance(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """‖norm(old_i) − norm(new_i)‖₂ per row: [b] (not squared)."""
    return torch.linalg.vector_norm(F.normalize(old.detach().to(new.dtype), dim=1) - F.normalize(new, dim=1), dim=1)


class L2(CompatibilityMethod):
    """L_cls + weight · mean max(0, ‖norm(old_i) − norm(new_i)‖₂ − margin); margin 0 here (plain L2)."""

    needs_old_features = True
    term = "l2"
    margin = 0.0  # no dead zone (weakened L2 sets its own)

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, args: L2Args = L2Args()
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.weight = args.weight

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if old is None:
            raise ValueError(f"{type(self).__name__} needs the old features of the batch")
        cls = self.head(new, labels)
        term = (feature_distance(new, old) - self.margin).clamp_min(0.0).mean()  # margin 0: the plain distance
        return {"loss": cls + self.weight * term, "cls": cls.detach(), self.term: term.detach()}


@register_method("l2", args=L2Args)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: L2Args) -> L2:
    return L2(embedding_dim, num_classes, s=s, m=m, args=args)
