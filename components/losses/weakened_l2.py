"""Weakened L2 baseline (method.md, "Baselines"):

    L = L_cls + 10 · mean max(0, ‖norm(old_i) − norm(new_i)‖₂ − 0.2)

The L2 feature regression with a dead zone of radius 0.2 around each old feature, so new features may move a
little without penalty; as in the MixBCT authors' baseline code (Liang et al., "MixBCT: Towards
Self-Adapting Backward-Compatible Training", arXiv:2308.06948, 2023), building on the ℓ2 baseline of
Shen et al. (CVPR 2020, arXiv:2003.11942).

Shapes: new [b, d] (grad), old [b, d] frozen old features of the same images, labels [b].
"""

from __future__ import annotations

from pydantic import Field

from components.losses import register_method
from components.losses.l2 import L2, L2Args


class WeakenedL2Args(L2Args):
    """L2's weight (10) plus the hinge."""

    margin: float = Field(0.2, ge=0)  # method.md: 10 · mean max(0, ‖norm(old_i) − norm(new_i)‖₂ − 0.2)


class WeakenedL2(L2):
    term = "weakened_l2"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        args: WeakenedL2Args = WeakenedL2Args(),
    ) -> None:
        super().__init__(embedding_dim, num_classes, s=s, m=m, args=args)
        self.margin = args.margin


@register_method("weakened_l2", args=WeakenedL2Args)
def build(
    *, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: WeakenedL2Args
) -> WeakenedL2:
    return WeakenedL2(embedding_dim, num_classes, s=s, m=m, args=args)
