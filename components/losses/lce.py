"""LCE (Meng et al., "Learning Compatible Embeddings", ICCV 2021, arXiv:2108.01958), as method.md
("Baselines") writes it, with the new and old embeddings of equal size (no transformation module):

    L = L_cls(new) + L_boundary + L_align
    L_boundary = mean_i max(arccos⟨c_{y_i}, norm new_i⟩ − θ_{y_i}, 0)
    L_align    = mean_i (1 − ⟨c_{y_i}, norm W_{y_i}⟩)

c_y: L2-normalised mean of the L2-normalised old features of class y on the new training set [C, d];
W: the new ArcFace classifier (the alignment term moves W only). Both means run over the batch rows, so the
alignment weighs each class by its share of the batch.

θ_y (interpretation choice, method.md leaves it open): the class's angular radius in the OLD space, the
largest angle arccos⟨c_y, norm old_j⟩ over its old features after 1.5·IQR outlier removal (the same robust
maximum as AdvBCT's radius, `prototypes.iqr_max`). New features inside the old class's cone cost nothing. A
one-sample class has θ = 0. The cosine is clamped to [−1 + 1e-6, 1 − 1e-6] so arccos keeps a finite gradient.

Both statistics are buffers built in `prepare()`. Reported parts ("boundary", "align") are unweighted.
Shapes: new [b, d] (grad), labels [b]; prepare(): old [N, d], labels [N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method
from components.losses.arcface import ArcFaceHead
from components.losses.prototypes import class_centres, iqr_max, per_class

_EPS = 1e-6


class LCEArgs(MethodArgs):
    # method.md's weights (1 and 100 · MSE at ArcFace s = 16, ×4 at s = 64) belong to its cosine-boundary / MSE form;
    # this file's angular boundary and 1 − cos alignment keep weight 1 each (see the module docstring).
    boundary_weight: float = Field(1.0, ge=0)
    align_weight: float = Field(1.0, ge=0)


def class_angles(old: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """θ_y [C]: largest angle of a class's old features to its centre, after 1.5·IQR outlier removal."""
    unit = F.normalize(old.float(), dim=1)  # [N, d]
    angles = torch.arccos((unit * centres[labels.long()]).sum(dim=1).clamp(-1.0, 1.0))  # [N]
    return torch.tensor([iqr_max(angles[idx]) for idx in per_class(labels, centres.shape[0])])


class LCE(CompatibilityMethod):
    needs_old_features = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: LCEArgs = LCEArgs(),
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.boundary_weight, self.align_weight = args.boundary_weight, args.align_weight
        self.register_buffer("centres", torch.zeros(num_classes, embedding_dim))  # [C, d] unit rows
        self.register_buffer("theta", torch.zeros(num_classes))  # [C] radians
        self.register_buffer("prepared", torch.tensor(False))

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        if old is None:
            raise ValueError("LCE needs the old features of the training set")
        self.centres.copy_(class_centres(old, labels, self.centres.shape[0]))
        self.theta.copy_(class_angles(old, labels, self.centres))
        self.prepared.fill_(True)

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not bool(self.prepared):
            raise RuntimeError("LCE.prepare() was not called: no old class centres")
        cls = self.head(new, labels)
        centres = self.centres[labels].to(new.dtype)  # [b, d]
        cos = (F.normalize(new, dim=1) * centres).sum(dim=1).clamp(-1.0 + _EPS, 1.0 - _EPS)  # [b]
        boundary = (torch.arccos(cos) - self.theta[labels]).clamp_min(0.0).mean()
        align = (1.0 - (F.normalize(self.head.weight[labels], dim=1) * centres).sum(dim=1)).mean()
        loss = cls + self.boundary_weight * boundary + self.align_weight * align
        return {"loss": loss, "cls": cls.detach(), "boundary": boundary.detach(), "align": align.detach()}


@register_method("lce", args=LCEArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: LCEArgs) -> LCE:
    return LCE(embedding_dim, num_classes, s=s, m=m, args=args)
