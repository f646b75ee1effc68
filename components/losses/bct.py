"""BCT (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020, arXiv:2003.11942):
the influence loss, as method.md ("Baselines") and the MixBCT authors' baseline code define it.

    L = L_cls(new) + CE(norm(new_i) · Pᵀ · scale, y_i)

P [C, d] is frozen: the L2-normalised class means of the OLD features of the *new* training set (built in
`prepare()`, a buffer, so it travels in the checkpoint). The old classifier is never used, so classes the old
model never saw get a prototype too. Rows are L2-normalised before averaging (`prototypes.class_centres`).

The logits are scaled by the ArcFace scale s (64) by default, as method.md asks: every added term acts at the
scale of L_cls. The MixBCT authors' code feeds raw cosine logits (`train.method_args: {scale: 1.0}`), which at
thousands of classes stays near ln C and barely acts: a labelled variant, not the default.

Shapes: new [b, d] (grad), labels [b]; prepare(): old [N, d], labels [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method
from components.losses.arcface import ArcFaceHead
from components.losses.prototypes import class_centres


class BCTArgs(MethodArgs):
    # method.md: CE(s · ⟨norm(new_i), P_k⟩, y_i) with s = the L_cls scale (64); None: the ArcFace s
    scale: float | None = Field(None, gt=0)


class BCT(CompatibilityMethod):
    needs_old_features = True

    def __init__(
        self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5, args: BCTArgs = BCTArgs()
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.num_classes = num_classes
        self.scale = s if args.scale is None else args.scale
        self.register_buffer("prototypes", torch.zeros(num_classes, embedding_dim))  # [C, d] frozen, unit rows
        self.register_buffer("prepared", torch.tensor(False))

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        if old is None:
            raise ValueError(f"{type(self).__name__} needs the old features of the training set")
        self.prototypes.copy_(class_centres(old, labels, self.num_classes))
        self.prepared.fill_(True)

    def influence(self, new: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE of the new features against the frozen old prototypes (the 'influence loss')."""
        if not bool(self.prepared):
            raise RuntimeError(f"{type(self).__name__}.prepare() was not called: no old prototypes")
        logits = F.normalize(new, dim=1) @ self.prototypes.to(new.dtype).t() * self.scale  # [b, C]
        return F.cross_entropy(logits, labels)

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        cls = self.head(new, labels)
        influence = self.influence(new, labels)
        return {"loss": cls + influence, "cls": cls.detach(), "influence": influence.detach()}


@register_method("bct", args=BCTArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: BCTArgs) -> BCT:
    return BCT(embedding_dim, num_classes, s=s, m=m, args=args)
