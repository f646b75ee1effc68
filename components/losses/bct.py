"""BCT (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020, arXiv:2003.11942):
the influence loss, as method.md ("Baselines") defines it.

    L = L_cls(new) + λ · L_inf,    L_inf = CE(s · norm(new_i) · Pᵀ, y_i),    s = the ArcFace s (64), λ = 1

L_inf is the old model's classification loss with its classifier frozen and applied to the new feature, in
normalised form. P [C, d] (unit rows, frozen, a buffer built in `prepare()`, so it travels in the checkpoint):
- for a class the old model was trained on, the old head's row (L2-normalised, bias dropped), given with
  `set_old_classifier(rows, known)` before `prepare()`;
- for a class it never saw, BCT's "synthesised classifier": the L2-normalised mean of the L2-normalised old
  features of that class on the new training set (`prototypes.class_centres`).
Without `set_old_classifier` every class is synthesised: the open-class scenario (no new class was seen by the
old model) is exactly that case. `prototypes.influence_prototypes` combines the two.

The logits are scaled by s as method.md asks: every added term acts at the scale of L_cls. A unit-scale CE over
thousands of classes stays near ln C and barely acts.

Variant, registered beside it and labelled (`method_label`): "bct_authors", the MixBCT authors' re-implementation
(Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training", arXiv:2308.06948): raw cosine logits
(s dropped, logits in [−1, 1]) against the synthesised classifier for every class (the old head is never used).

Reported "influence" is L_inf unweighted. Shapes: new [b, d] (grad), labels [b]; prepare(): old [N, d], labels
[N]; set_old_classifier(): rows [C, d], known [C] bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method, register_variant
from components.losses.arcface import ArcFaceHead
from components.losses.prototypes import check_old_classifier, influence_prototypes


class BCTArgs(MethodArgs):
    influence_weight: float = Field(1.0, ge=0)  # method.md: L_cls + λ · L_inf, λ = 1


class BCT(CompatibilityMethod):
    """The influence head. `authors=True` builds the MixBCT authors' variant (unscaled, synthesised only)."""

    needs_old_features = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: BCTArgs = BCTArgs(),
        *,
        authors: bool = False,
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.influence_weight = args.influence_weight
        self.authors = authors
        self.scale = 1.0 if authors else s  # the logit scale: L_cls's s; the authors' variant drops it
        self.accepts_old_classifier = not authors  # the authors' variant never uses the old head
        self.register_buffer("prototypes", torch.zeros(num_classes, embedding_dim))  # [C, d] frozen
        self.register_buffer("known", torch.zeros(num_classes, dtype=torch.bool))  # [C] rows from the old head
        self.register_buffer("prepared", torch.tensor(False))
        self._old_rows: torch.Tensor | None = None  # [C, d] unit rows where known (not in the checkpoint: P is)

    def set_old_classifier(self, rows: torch.Tensor, known: torch.Tensor) -> None:
        if not self.accepts_old_classifier:
            super().set_old_classifier(rows, known)  # raises
        if bool(self.prepared):
            raise RuntimeError(f"{type(self).__name__}.set_old_classifier() must be called before prepare()")
        self._old_rows, known = check_old_classifier(rows, known, self.num_classes, self.embedding_dim)
        self.known.copy_(known)

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        if old is None:
            raise ValueError(f"{type(self).__name__} needs the old features of the training set")
        protos = influence_prototypes(old, labels, self.num_classes, self._old_rows, self.known.cpu())  # [C, d]
        self.prototypes.copy_(protos)
        self.prepared.fill_(True)

    def influence(self, new: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_inf: CE of the scaled new features against the frozen head P (the 'influence loss')."""
        if not bool(self.prepared):
            raise RuntimeError(f"{type(self).__name__}.prepare() was not called: no old prototypes")
        logits = F.normalize(new, dim=1) @ self.prototypes.to(new.dtype).t() * self.scale  # [b, C]
        return F.cross_entropy(logits, labels)

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        cls = self.head(new, labels)
        influence = self.influence(new, labels)
        loss = cls + self.influence_weight * influence
        return {"loss": loss, "cls": cls.detach(), "influence": influence.detach()}


@register_method("bct", args=BCTArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: BCTArgs) -> BCT:
    return BCT(embedding_dim, num_classes, s=s, m=m, args=args)


@register_method("bct_authors", args=BCTArgs)
def build_authors(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: BCTArgs) -> BCT:
    return BCT(embedding_dim, num_classes, s=s, m=m, args=args, authors=True)


register_variant(
    "bct_authors", of="bct", label="BCT (MixBCT authors' variant: unscaled cosine logits, synthesised classifier)"
)
