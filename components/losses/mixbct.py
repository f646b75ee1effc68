"""MixBCT (Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training",
arXiv:2308.06948, 2023/2024), exactly as method.md describes the authors' code.

Each step, on a batch of b new features f [b, d] with labels y:
  1. among the batch's *credible* samples, choose floor(α·b) at random (a seeded generator);
  2. replace those rows of f with the L2-normalised old features of the same images (row replacement);
  3. one ArcFace loss (s = 64, m = 0.5) on the mixed batch, against the new model's own classifier W.
No other term, no weight. Replaced rows are constants, so the backbone gets gradient only from the other rows
while W gets it from all rows: old features pull each prototype W_y toward the old cluster.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from components.losses import CompatibilityMethod, MethodArgs, register_method
from components.losses.arcface import ArcFaceHead
from components.losses.l2 import feature_distance


class MixBCTArgs(MethodArgs):
    """MixBCT's own argument. The credible keep ratio T belongs to extraction (`extract.credible_keep`)."""

    alpha: float = Field(0.3, ge=0, le=1)  # share of each batch replaced by old features (method.md: α = 0.3)
    # Not in the paper, for the shift study only: + l2_weight · mean ‖norm(old_i) − norm(new_i)‖₂ over the batch's
    # own (unmixed) features, the L2 baseline's term (its weight there is 10). 0 = MixBCT exactly.
    l2_weight: float = Field(0.0, ge=0)
    # Run the backbone only on the rows MixBCT keeps (issue "Past one process", item 5): the replaced rows' features
    # are the old ones either way, so their forward and backward are wasted work (the authors' code does it too).
    # The same rows are drawn; BatchNorm then sees b − floor(α·b) rows per step, which can change the result.
    # params.yaml turns it on (measured equal within the intervals: docs/skip/results.md). With l2_weight > 0 the
    # L2 term reads every row's new feature, so the backbone runs on every row whatever this says.
    skip_replaced: bool = False


def choose_rows(credible: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of floor(α·b) rows drawn uniformly without replacement among the credible ones.

    When fewer than floor(α·b) rows are credible, all credible rows are taken.
    """
    b = credible.numel()
    k = math.floor(alpha * b)
    candidates = torch.nonzero(credible, as_tuple=False).flatten()  # [n_credible]
    if k == 0 or candidates.numel() == 0:
        return candidates[:0]
    order = torch.randperm(candidates.numel(), generator=generator)
    return candidates[order[: min(k, candidates.numel())]]


def mix_features(new: torch.Tensor, old: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Copy of `new` [b, d] whose `rows` are the L2-normalised, detached `old` rows (no gradient path)."""
    replacement = F.normalize(old[rows].detach().to(new.dtype), dim=1)  # [k, d]
    return new.index_put((rows,), replacement)  # out of place: grads flow to the untouched rows only


class MixBCT(CompatibilityMethod):
    needs_old_features = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        seed: int = 0,
        args: MixBCTArgs = MixBCTArgs(),
    ) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.alpha = args.alpha
        self.l2_weight = args.l2_weight
        self.skip_replaced = args.skip_replaced
        # The authors' code leaves the subset unseeded; a seeded generator makes runs (and resumes) exact.
        self.generator = torch.Generator().manual_seed(seed)

    def replaced_rows(self, credible: torch.Tensor | None) -> torch.Tensor | None:
        """With skip_replaced, this step's replaced rows, drawn now (forward then gets them back as `rows`)."""
        if not self.skip_replaced or self.l2_weight > 0:
            return None
        if credible is None:
            raise ValueError("MixBCT needs the credible mask of the batch")
        return choose_rows(credible, self.alpha, self.generator)

    def forward(self, new, labels, old=None, credible=None, rows=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """`rows`: the replaced rows when `replaced_rows` drew them (the backbone then skipped them: their rows of
        `new` are placeholders); otherwise they are drawn here."""
        if old is None or credible is None:
            raise ValueError("MixBCT needs the old features and the credible mask of the batch")
        if old.shape != new.shape:
            raise ValueError(f"old features {tuple(old.shape)} and new features {tuple(new.shape)} differ in shape")
        if rows is None:
            rows = choose_rows(credible, self.alpha, self.generator)
        elif self.l2_weight > 0:
            raise ValueError("MixBCT: l2_weight reads every row's new feature; it cannot skip the replaced rows")
        mixed = mix_features(new, old, rows)  # [b, d]
        loss = self.head(mixed, labels)
        out = {"loss": loss, "cls": loss.detach(), "mixed_rows": torch.tensor(float(rows.numel()))}
        if self.l2_weight > 0:  # "L2 + MixBCT" (shift study), not the paper's method
            term = feature_distance(new, old).mean()
            out["loss"], out["l2"] = loss + self.l2_weight * term, term.detach()
        return out

    def seed_step(self, seed: int) -> None:
        # torchrun: rows drawn per (seed, step, rank) (one process keeps the single stream above, as before)
        self.generator.manual_seed(seed)

    # The generator's state travels in state_dict, so a resumed run draws the same subsets.
    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


@register_method("mixbct", args=MixBCTArgs)
def build(*, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: MixBCTArgs) -> MixBCT:
    return MixBCT(embedding_dim, num_classes, s=s, m=m, seed=seed, args=args)
