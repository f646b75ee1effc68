"""UniBCT (Zhang et al., "Towards Universal Backward-Compatible Representation Learning", IJCAI 2022,
arXiv:2203.01583): BCT's influence head on *refined* old prototypes, as method.md ("Baselines") defines it.

    L = L_cls(new)                                       for epochs < switch-on = ⌈start_fraction · epochs⌉
    L = L_cls(new) + λ_inf · CE(s · norm(new_i) · Pᵀ, y_i)  from then on (s = the ArcFace s, 64; λ_inf = 1)

P is BCT's head (`bct.py`): the old classifier's normalised row for classes the old model was trained on (given
with `set_old_classifier` before `prepare()`), a prototype built from the old features for the others.

Structural prototype refinement of the feature-built prototypes, per class c with n_c samples (a graph over the
class's own samples only: an N × N system over the whole training set would not fit):
    F = norm(F_new[c])  [n_c, d]   current new features (from `embed_train()`), L2-normalised
    O = norm(O_old[c])  [n_c, d]   old features, L2-normalised
    A = column-softmax(F Fᵀ / τ) with the diagonal masked           [n_c, n_c], each column sums to 1
    Ô = (1 − λ)(I − λA)⁻¹ O        (torch.linalg.solve, float64)    [n_c, d]
    P_c = norm(mean_i Ô_i)                                          λ = 0.9, τ = 0.05
A single-sample class has no neighbour: Ô = O (the authors' −1e9 mask gives the same). Rows given by the old
classifier are kept as they are (interpretation: method.md refines prototypes estimated from old features; the
old head's own rows need no estimate). P_c is normalised so that the head acts at the scale s, like BCT's.

Refinement runs in `on_epoch_start` at the switch-on epoch and at every epoch listed in `refresh_epochs`
(default: none, i.e. once at switch-on). P is a buffer, so a resumed run keeps the refined prototypes.

Note, a property of the formula as written (and of the authors' code): A is column-stochastic, so
1ᵀ(I − λA)⁻¹ = 1ᵀ/(1 − λ) and mean_i Ô_i = mean_i O_i exactly. With the mean taken over the same per-class
graph, the refined prototypes equal BCT's synthesised ones (up to rounding); what UniBCT adds here is the delayed
switch-on.

Variant, registered beside it and labelled: "unibct_authors", the MixBCT authors' re-implementation
(`refine_prototype.py`, arXiv:2308.06948): raw cosine logits (s dropped), the refined means loaded *unnormalised*
into the head (so the logits are cos · ‖P_c‖ < 1), every class from the old features (the old head is never
used). Not reproduced: their graph runs on raw, unnormalised features; here both variants normalise F and O.

Shapes: new [b, d] (grad), labels [b]; prepare(): old [N, d], labels [N]; embed_train() -> [N, d].
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt

from components.losses import register_method, register_variant
from components.losses.bct import BCT, BCTArgs
from components.losses.prototypes import per_class


class UniBCTArgs(BCTArgs):
    """BCT's weight plus the schedule and the refinement (method.md, "Baselines", UniBCT)."""

    start_fraction: float = Field(0.3, ge=0, le=1)  # method.md: head off for the first ~30% of epochs
    refresh_epochs: tuple[NonNegativeInt, ...] = ()  # epochs (0-based) refined again after switch-on
    lam: float = Field(0.9, gt=0, lt=1)  # method.md: λ = 0.9 ((I − λA) must stay invertible)
    tau: float = Field(0.05, gt=0)  # method.md: τ = 0.05


def refine_prototypes(
    new: torch.Tensor,  # [N, d] current new features of the training set
    old: torch.Tensor,  # [N, d] old features, same order
    labels: torch.Tensor,  # [N]
    num_classes: int,
    lam: float = 0.9,
    tau: float = 0.05,
    normalise: bool = True,
) -> torch.Tensor:
    """Refined prototypes [C, d] (L2-normalised unless `normalise` is False); classes of equal size are solved as
    one batch; a class without samples gets a zero row."""
    new_u = F.normalize(new.double(), dim=1)
    old_u = F.normalize(old.double(), dim=1)
    out = torch.zeros(num_classes, old.shape[1], dtype=torch.float64)
    by_size: dict[int, list[int]] = defaultdict(list)
    rows = per_class(labels, num_classes)
    for c, idx in enumerate(rows):
        if idx.numel():
            by_size[idx.numel()].append(c)
    for n, classes in by_size.items():
        idx = torch.stack([rows[c] for c in classes])  # [k, n]
        o = old_u[idx]  # [k, n, d]
        if n == 1:
            refined = o
        else:
            f = new_u[idx]  # [k, n, d]
            sim = f @ f.transpose(1, 2) / tau  # [k, n, n]
            sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
            a = torch.softmax(sim, dim=1)  # column-softmax: every column j sums to 1 over i
            system = torch.eye(n, dtype=a.dtype) - lam * a  # [k, n, n]
            refined = (1.0 - lam) * torch.linalg.solve(system, o)  # [k, n, d]
        out[torch.tensor(classes)] = refined.mean(dim=1)
    return (F.normalize(out, dim=1) if normalise else out).float()


class UniBCT(BCT):
    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: UniBCTArgs = UniBCTArgs(),
        *,
        authors: bool = False,
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, m=m, args=args, authors=authors)
        self.start_fraction, self.refresh_epochs = args.start_fraction, set(args.refresh_epochs)
        self.lam, self.tau = args.lam, args.tau
        self.active = False  # set before every epoch by on_epoch_start, so it needs no checkpoint
        self.register_buffer("refined_epoch", torch.tensor(-1))  # last refinement (-1: plain BCT head)
        self._old: torch.Tensor | None = None  # [N, d] kept from prepare() (called again on resume)
        self._labels: torch.Tensor | None = None

    def switch_on_epoch(self, epochs: int) -> int:
        """First epoch (0-based) with the head on: ⌈start_fraction · epochs⌉ (rounded: 0.3·10 is 3.0…04)."""
        return math.ceil(round(self.start_fraction * epochs, 9))

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        super().prepare(old, labels)  # BCT's head until the first refinement
        self._old, self._labels = old, labels

    def on_epoch_start(self, epoch: int, epochs: int, embed_train: Callable[[], torch.Tensor]) -> None:
        start = self.switch_on_epoch(epochs)
        self.active = epoch >= start
        if epoch == start or epoch in self.refresh_epochs:
            if self._old is None or self._labels is None:
                raise RuntimeError("UniBCT.prepare() was not called: no old features to refine")
            refined = refine_prototypes(
                embed_train(), self._old, self._labels, self.num_classes, self.lam, self.tau, normalise=not self.authors
            ).to(self.prototypes.device)  # fmt: skip
            self.prototypes.copy_(torch.where(self.known[:, None], self.prototypes, refined))  # old-head rows stay
            self.refined_epoch.fill_(epoch)

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        cls = self.head(new, labels)
        if not self.active:
            return {"loss": cls, "cls": cls.detach(), "influence": torch.zeros(())}
        influence = self.influence(new, labels)
        loss = cls + self.influence_weight * influence
        return {"loss": loss, "cls": cls.detach(), "influence": influence.detach()}


@register_method("unibct", args=UniBCTArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: UniBCTArgs) -> UniBCT:
    return UniBCT(embedding_dim, num_classes, s=s, m=m, args=args)


@register_method("unibct_authors", args=UniBCTArgs)
def build_authors(
    *, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: UniBCTArgs
) -> UniBCT:
    return UniBCT(embedding_dim, num_classes, s=s, m=m, args=args, authors=True)


register_variant(
    "unibct_authors",
    of="unibct",
    label="UniBCT (MixBCT authors' variant: unscaled cosine logits, unnormalised refined means)",
)
