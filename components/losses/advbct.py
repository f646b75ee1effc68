"""AdvBCT (Pan et al., "Boundary-Aware Backward-Compatible Representation via Adversarial Learning in Image
Retrieval", CVPR 2023, arXiv:2305.02610), as method.md ("Baselines") and the MixBCT authors'
re-implementation (Liang et al., arXiv:2308.06948) define it.

    L = L_cls(new) + L_p2s + L_adv

Point-to-set term, from old-feature statistics built once in `prepare()` (buffers):
    c_y  = L2-normalised mean of the L2-normalised old features of class y                       [C, d]
    r_y  = max ‖norm old_j − c_y‖ over the class after 1.5·IQR outlier removal (`prototypes.iqr_max`) [C]
    r′_y = r_y + σ(β_y) · (0.4 − r_y)      elastic boundary, β [C] learnable, initialised 0 (r′ halfway)
    L_p2s = 4 · Σ_i max(‖norm new_i − c_{y_i}‖ − r′_{y_i}, 0) / #{i : ‖norm new_i − c_{y_i}‖ > r′_{y_i}}
The parametrisation is the authors' `ElasticBoundary` written in closed form: they move r by
|r − 0.4|·σ(β) toward 0.4 (up when r < 0.4, down otherwise), which is exactly r + σ(β)(0.4 − r); they
initialise β uniformly in [−1, 1], here 0 for a deterministic start. A one-sample class has r = 0.
The sum is divided by the number of violating samples of the batch (per violating sample, as method.md and the
authors' code have it), so the term keeps its strength as fewer samples violate; a batch with no violating
sample gives 0. The authors' code also skips one-sample classes; here they take part (r = 0, r′ = σ(β)·0.4).

Adversarial term: an MLP discriminator D (d → 100, BatchNorm, ReLU → 2 classes) tells old (label 1) from new
(label 0) L2-normalised features; new features reach D through a gradient-reversal layer with the DANN
coefficient α = 2/(1 + e^{−10p}) − 1, p = training progress, so the backbone learns to fool D:
    L_adv = 4 · (E − e + 1)/E · (NLL(D(GRL(norm new)), 0) + NLL(D(norm old), 1))
with e the 0-based epoch (known from `on_epoch_start`) and E the number of epochs: the weight decays over
epochs, as in the authors' code. p counts steps within the epoch from the training-set size given to
`prepare()` and the batch size (the loop drops the last partial batch).

Reported parts ("p2s", "adv") are the unweighted terms. Shapes: new [b, d] (grad), old [b, d], labels [b];
prepare(): old [N, d], labels [N].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.losses import CompatibilityMethod, MethodArgs, register_method
from components.losses.arcface import ArcFaceHead
from components.losses.prototypes import class_centres, iqr_max, per_class


class AdvBCTArgs(MethodArgs):
    p2s_weight: float = Field(4.0, ge=0)  # method.md: L_p2s = 4 · Σ max(…, 0) / (number of violating samples)
    adv_weight: float = Field(4.0, ge=0)  # authors' code: 4 · (E − e + 1)/E · adversarial NLL
    boundary_target: float = Field(0.4, ge=0, le=2)  # method.md: elastic boundary around 0.4 (unit-sphere distance)
    hidden: int = Field(100, ge=1)  # discriminator width, authors' code (d → 100 → 2)


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the gradient by −α backward (Ganin & Lempitsky, arXiv:1409.7495)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.alpha * grad, None


def class_radii(old: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """r_y [C]: largest distance of a class's normalised old features to its centre, after 1.5·IQR."""
    unit = F.normalize(old.float(), dim=1)  # [N, d]
    dist = torch.linalg.vector_norm(unit - centres[labels.long()], dim=1)  # [N]
    return torch.tensor([iqr_max(dist[idx]) for idx in per_class(labels, centres.shape[0])])


class AdvBCT(CompatibilityMethod):
    needs_old_features = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: AdvBCTArgs = AdvBCTArgs(),
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.p2s_weight, self.adv_weight, self.boundary_target = args.p2s_weight, args.adv_weight, args.boundary_target
        self.boundary = nn.Parameter(torch.zeros(num_classes))  # β [C]: r′ = r + σ(β)(0.4 − r)
        hidden = args.hidden
        self.discriminator = nn.Sequential(
            nn.Linear(embedding_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )
        self.register_buffer("centres", torch.zeros(num_classes, embedding_dim))  # [C, d] unit rows
        self.register_buffer("radii", torch.zeros(num_classes))  # [C]
        self.register_buffer("prepared", torch.tensor(False))
        self.epoch, self.epochs, self.step = 0, 1, 0  # set by on_epoch_start (every epoch, also on resume)
        self._n_train: int | None = None

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        if old is None:
            raise ValueError("AdvBCT needs the old features of the training set")
        self.centres.copy_(class_centres(old, labels, self.centres.shape[0]))
        self.radii.copy_(class_radii(old, labels, self.centres))
        self.prepared.fill_(True)
        self._n_train = len(labels)

    def on_epoch_start(self, epoch: int, epochs: int, embed_train: Callable[[], torch.Tensor]) -> None:
        self.epoch, self.epochs, self.step = epoch, epochs, 0

    def elastic_radii(self, labels: torch.Tensor) -> torch.Tensor:
        """r′ [b] of each row's class."""
        r = self.radii[labels]
        return r + torch.sigmoid(self.boundary[labels]) * (self.boundary_target - r)

    def grl_alpha(self, batch_size: int) -> float:
        steps_per_epoch = max(1, self._n_train // batch_size) if self._n_train else 1
        p = (self.epoch + min(self.step, steps_per_epoch) / steps_per_epoch) / self.epochs
        return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0

    def adv_decay(self) -> float:
        return (self.epochs - self.epoch + 1) / self.epochs

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if old is None:
            raise ValueError("AdvBCT needs the old features of the batch")
        if not bool(self.prepared):
            raise RuntimeError("AdvBCT.prepare() was not called: no old class centres")
        cls = self.head(new, labels)
        new_u = F.normalize(new, dim=1)  # [b, d]
        dist = torch.linalg.vector_norm(new_u - self.centres[labels].to(new.dtype), dim=1)  # [b]
        excess = (dist - self.elastic_radii(labels)).clamp_min(0.0)  # [b]
        p2s = excess.sum() / (excess > 0).sum().clamp_min(1)  # per violating sample

        alpha = self.grl_alpha(len(labels))
        if self.training:
            self.step += 1
        d_new = self.discriminator(GradReverse.apply(new_u, alpha))  # [b, 2]
        d_old = self.discriminator(F.normalize(old.detach().to(new.dtype), dim=1))  # [b, 2]
        adv = F.cross_entropy(d_new, torch.zeros_like(labels)) + F.cross_entropy(d_old, torch.ones_like(labels))

        loss = cls + self.p2s_weight * p2s + self.adv_weight * self.adv_decay() * adv
        return {"loss": loss, "cls": cls.detach(), "p2s": p2s.detach(), "adv": adv.detach()}


@register_method("advbct", args=AdvBCTArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: AdvBCTArgs) -> AdvBCT:
    return AdvBCT(embedding_dim, num_classes, s=s, m=m, args=args)
