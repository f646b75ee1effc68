"""LCE (Meng et al., "Learning Compatible Embeddings", ICCV 2021, arXiv:2108.01958), as method.md ("Baselines")
writes it, with the new and old embeddings of equal size (no transformation module):

    L = L_cls(new) + k · λ_b · L_boundary + k · λ_a · L_align          λ_b = 1, λ_a = 100, k = s/16 = 4
    L_boundary = mean_i max(cos θ_{y_i,min} − ⟨c_{y_i}, norm new_i⟩, 0)
    L_align    = MSE(norm W, c) = mean over classes c and dimensions j of (norm W_c − c_c)_j²

c_y: L2-normalised mean of the L2-normalised old features of class y on the new training set [C, d]
(`prototypes.class_centres`); W: the new ArcFace classifier [C, d] (the alignment term moves W only, so it sends
no gradient to the backbone). As in the official code (IrvingMeng/LCE, `main.py`), the alignment runs over every
class of the head each step (classes without a training sample, whose c is a zero row, are left out), and
torch's MSE averages over C·d elements.

cos θ_{y,min} (interpretation, method.md is silent): the smallest cosine ⟨norm old_j, c_y⟩ of the class's own old
features to its centre, after 1.5·IQR outlier removal on those cosines (`prototypes.iqr_min`, the quartile
convention of AdvBCT's radius): new features at least as close to the old centre as the old class's least
typical inlier cost nothing. The official code takes the plain minimum; the outlier removal keeps one stray
(mislabelled) sample from making the boundary vacuous. A one-sample class has cos θ_min = 1.
method.md's boundary reads the *normalised* new feature (the official code dots the raw feature).

Scale: the official weights (λ_b = 1, λ_a = 100) go with ArcFace s = 16, m = 0.1; at s = 64 both are scaled by
`weight_scale` k = s/16 = 4 by default (method.md). k is a typed argument so that ×4, ×16, ×64 can be swept on a
validation split of the training identities (never on the test set).

Variant, registered beside it and labelled: "lce_authors", the official weights unscaled (k = 1) at s = 64.

Both statistics are buffers built in `prepare()`. Reported parts ("boundary", "align") are unweighted.
Shapes: new [b, d] (grad), labels [b]; prepare(): old [N, d], labels [N]; W [C, d].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method, register_variant
from components.losses.arcface import ArcFaceHead
from components.losses.prototypes import class_centres, iqr_min, per_class


class LCEAuthorsArgs(MethodArgs):
    """The official weights (the authors' variant applies them as they are, k = 1)."""

    boundary_weight: float = Field(1.0, ge=0)  # method.md / official code: λ_b = 1 (at ArcFace s = 16)
    align_weight: float = Field(100.0, ge=0)  # method.md / official code: λ_a = 100 · MSE (at ArcFace s = 16)


class LCEArgs(LCEAuthorsArgs):
    weight_scale: float = Field(4.0, ge=0)  # method.md: both weights × s/16 = 4 at s = 64; sweep ×4, ×16, ×64


def class_min_cosines(old: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """cos θ_min [C]: smallest cosine of a class's normalised old features to its centre, after 1.5·IQR."""
    unit = F.normalize(old.float(), dim=1)  # [N, d]
    cos = (unit * centres[labels.long()]).sum(dim=1).clamp(-1.0, 1.0)  # [N]
    return torch.tensor([iqr_min(cos[idx]) if idx.numel() else 1.0 for idx in per_class(labels, centres.shape[0])])


class LCE(CompatibilityMethod):
    needs_old_features = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: LCEAuthorsArgs = LCEArgs(),
        *,
        authors: bool = False,
    ) -> None:
        super().__init__()
        if not authors and not isinstance(args, LCEArgs):
            raise TypeError(f"LCE takes LCEArgs (with its weight_scale), got {type(args).__name__}")
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.weight_scale = 1.0 if authors else args.weight_scale  # type: ignore[attr-defined]
        self.boundary_weight = self.weight_scale * args.boundary_weight  # effective weights
        self.align_weight = self.weight_scale * args.align_weight
        self.register_buffer("centres", torch.zeros(num_classes, embedding_dim))  # [C, d] unit rows (zero: no sample)
        self.register_buffer("cos_min", torch.ones(num_classes))  # [C] cos θ_min
        self.register_buffer("prepared", torch.tensor(False))

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        if old is None:
            raise ValueError("LCE needs the old features of the training set")
        self.centres.copy_(class_centres(old, labels, self.centres.shape[0]))
        self.cos_min.copy_(class_min_cosines(old, labels, self.centres))
        self.prepared.fill_(True)

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not bool(self.prepared):
            raise RuntimeError("LCE.prepare() was not called: no old class centres")
        cls = self.head(new, labels)
        cos = (F.normalize(new, dim=1) * self.centres[labels].to(new.dtype)).sum(dim=1)  # [b]
        boundary = (self.cos_min[labels].to(new.dtype) - cos).clamp_min(0.0).mean()
        has = self.centres.abs().sum(dim=1) > 0  # [C] classes with a centre
        w = F.normalize(self.head.weight[has], dim=1)  # [C', d]
        align = F.mse_loss(w, self.centres[has].to(w.dtype))
        loss = cls + self.boundary_weight * boundary + self.align_weight * align
        return {"loss": loss, "cls": cls.detach(), "boundary": boundary.detach(), "align": align.detach()}


@register_method("lce", args=LCEArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: LCEArgs) -> LCE:
    return LCE(embedding_dim, num_classes, s=s, m=m, args=args)


@register_method("lce_authors", args=LCEAuthorsArgs)
def build_authors(
    *, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: LCEAuthorsArgs
) -> LCE:
    return LCE(embedding_dim, num_classes, s=s, m=m, args=args, authors=True)


register_variant("lce_authors", of="lce", label="LCE (official weights unscaled at s = 64: ×1 instead of s/16 = 4)")
