"""Every added compatibility term acts at the scale of L_cls (method.md, "Baselines"; ArcFace s = 64).

At initialisation (a fresh method: ArcFace W ~ N(0, 0.01), BCT-style heads built from the old features, NCCL's
queue full) on a realistic batch (b = 128, d = 128, C = 500 classes; old features with class structure, the new
features of an untrained model), the gradient norm of the ADDED term with respect to the new features
(‖∂L/∂new − ∂L_cls/∂new‖, Frobenius over [b, d]) is compared with ArcFace's (‖∂L_cls/∂new‖).

Claim: within a factor 10 either way. It holds for BCT, UniBCT (head on) and NCCL; L2 / weakened L2 sit at its
lower edge (0.100: weight 10 on a distance whose gradient has norm ≈ 0.7 per row, against ArcFace's ≈ 70).
It does NOT hold at initialisation for LCE (×4) and AdvBCT with method.md's weights: their hinges have gradients of
norm ≤ 1 per violating row and weights 4, i.e. 1/17 and 1/25 of ArcFace's gradient; marked strict xfail (so that a
change of weights shows up here) and reported. LCE's sweep point ×16 is at scale.

The MixBCT authors' variants ("bct_authors", "unibct_authors", "nccl_authors", "lce_authors") are measured too:
their added terms are one to two orders of magnitude below the band. That is the misconfiguration method.md
describes (a unit-scale term next to s = 64 leaves the method near the paragon), documented here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from components.losses import build_method

B, D, C, PER_CLASS = 128, 128, 500, 20  # N = 10,000 training rows, so NCCL's 8192-entry queue can be full
BAND = (0.1, 10.0)  # one order of magnitude either way


@pytest.fixture(autouse=True)
def _one_thread():
    """Deterministic and polite on a shared 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class World:
    old_all: torch.Tensor  # [N, D] old features of the new training set (unnormalised, class structure)
    labels_all: torch.Tensor  # [N]
    rows: torch.Tensor  # [B] the batch's rows
    new: torch.Tensor  # [B, D] new features of the batch (untrained model: no relation to the old ones)
    new_all: torch.Tensor  # [N, D] the same for the whole training set (UniBCT's refinement)


@pytest.fixture(scope="module")
def world() -> World:
    g = torch.Generator().manual_seed(1000)  # apart from torch.manual_seed(0), which draws the ArcFace W
    directions = F.normalize(torch.randn(C, D, generator=g), dim=1)  # [C, D]
    labels_all = torch.arange(C).repeat_interleave(PER_CLASS)  # [N]
    # cosine to the class centre ≈ 0.7: a usable, not perfect, old model; norm ≈ 7, as raw features are
    old_all = 5.0 * (directions[labels_all] + 0.09 * torch.randn(C * PER_CLASS, D, generator=g))
    rows = torch.randperm(C * PER_CLASS, generator=g)[:B]
    new = torch.randn(B, D, generator=g)
    new_all = torch.randn(C * PER_CLASS, D, generator=g)
    return World(old_all, labels_all, rows, new, new_all)


def added_term_ratio(name: str, world: World, args: dict | None = None) -> float:
    """‖∂(L − L_cls)/∂new‖ / ‖∂L_cls/∂new‖ for a fresh method `name` on the world's batch."""
    torch.manual_seed(0)
    method = build_method(name, embedding_dim=D, num_classes=C, s=64.0, m=0.5, seed=0, args=args)
    method.prepare(world.old_all, world.labels_all)
    if name.startswith("unibct"):
        epochs = 10
        method.on_epoch_start(method.switch_on_epoch(epochs), epochs, lambda: world.new_all)  # head on, refined
        assert method.active
    else:
        method.on_epoch_start(0, 10, lambda: world.new_all)  # AdvBCT: p = 0, so the GRL passes nothing yet
    if name.startswith("nccl"):  # the steady state: a full queue of other rows' old features
        others = torch.ones(len(world.labels_all), dtype=torch.bool)
        others[world.rows] = False
        fill = others.nonzero().flatten()[: method.queue_labels.numel() - B]
        method.enqueue(world.old_all[fill], world.labels_all[fill])
    labels, old = world.labels_all[world.rows], world.old_all[world.rows]

    new = world.new.clone().requires_grad_()
    (total,) = torch.autograd.grad(method(new, labels, old)["loss"], new)
    new_cls = world.new.clone().requires_grad_()
    (cls,) = torch.autograd.grad(method.head(new_cls, labels), new_cls)
    assert cls.norm() > 0 and torch.isfinite(total).all()
    return float((total - cls).norm() / cls.norm())


_BELOW = (
    "method.md's weights put this hinge at 1/17 (LCE ×4) or 1/25 (AdvBCT, 4 · L_p2s) of ArcFace's gradient at "
    "initialisation: reported, not hidden"
)


@pytest.mark.parametrize(
    "name",
    [
        "bct",
        "unibct",
        "nccl",
        pytest.param("lce", marks=pytest.mark.xfail(strict=True, reason=_BELOW)),
        pytest.param("advbct", marks=pytest.mark.xfail(strict=True, reason=_BELOW)),
    ],
)
def test_added_term_is_within_an_order_of_magnitude_of_arcface(name: str, world: World) -> None:
    ratio = added_term_ratio(name, world)
    assert BAND[0] <= ratio <= BAND[1], f"{name}: added/ArcFace gradient norm {ratio:.4f}"


@pytest.mark.parametrize("name", ["l2", "weakened_l2"])
def test_l2_sits_at_the_lower_edge_of_the_band(name: str, world: World) -> None:
    """Weight 10 on ‖norm old − norm new‖ (gradient norm ≈ 0.7 per row, every row beyond weakened L2's 0.2 dead
    zone here) against ArcFace's ≈ 64 · 1.1 per row: 0.100, the edge itself, so asserted as such rather than as
    an inequality that float noise could flip."""
    assert added_term_ratio(name, world) == pytest.approx(BAND[0], rel=0.05)


def test_lce_weight_scale_multiplies_its_feature_gradient_and_x16_is_at_scale(world: World) -> None:
    """The boundary is LCE's only term on the features (the alignment moves W), so its gradient is linear in k."""
    by_k = {k: added_term_ratio("lce", world, {"weight_scale": k}) for k in (4.0, 16.0, 64.0)}
    assert by_k[16.0] == pytest.approx(4 * by_k[4.0], rel=1e-4)
    assert by_k[64.0] == pytest.approx(16 * by_k[4.0], rel=1e-4)
    assert BAND[0] <= by_k[16.0] <= BAND[1] and BAND[0] <= by_k[64.0] <= BAND[1]


@pytest.mark.parametrize(
    ("variant", "corrected", "factor"),
    [("bct_authors", "bct", 30.0), ("unibct_authors", "unibct", 30.0), ("nccl_authors", "nccl", 10.0)],
)
def test_authors_variants_act_far_below_the_scale(variant: str, corrected: str, factor: float, world: World) -> None:
    """The bug being fixed: unscaled logits (BCT, UniBCT) or a temperature of 1 (NCCL) next to s = 64."""
    ours, theirs = added_term_ratio(corrected, world), added_term_ratio(variant, world)
    assert theirs < BAND[0] / 5, f"{variant}: {theirs:.4f}"  # not even near the band
    assert theirs * factor < ours, f"{variant}: {theirs:.4f} vs {corrected}: {ours:.4f}"


def test_lce_authors_variant_is_a_quarter_of_lce(world: World) -> None:
    """The official weights unscaled (×1) at s = 64: exactly 1/4 of LCE's ×4 on the features."""
    ours, theirs = added_term_ratio("lce", world), added_term_ratio("lce_authors", world)
    assert theirs == pytest.approx(ours / 4, rel=1e-4) and theirs < BAND[0] / 5
