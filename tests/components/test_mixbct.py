"""MixBCT (arXiv:2308.06948) against a hand-written reference, and its gradient structure."""

from __future__ import annotations

import math

import numpy as np
import torch

from arcface_reference import reference_arcface

from components.losses import available_methods, build_method
from components.losses.arcface import ArcFaceHead
from components.losses.mixbct import MixBCT, MixBCTArgs, choose_rows


def test_registry_knows_mixbct_and_paragon() -> None:
    assert {"mixbct", "none"} <= set(available_methods())


def test_unknown_method_lists_known_ones() -> None:
    try:
        build_method("mixbtc", embedding_dim=4, num_classes=2)
    except ValueError as err:
        assert "mixbtc" in str(err) and "mixbct" in str(err)
    else:
        raise AssertionError("unknown method accepted")


def test_choose_rows_only_credible_floor_alpha_b() -> None:
    credible = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    rows = choose_rows(credible, alpha=0.3, generator=torch.Generator().manual_seed(0))
    assert len(rows) == math.floor(0.3 * 10) == 3
    assert credible[rows].all() and len(set(rows.tolist())) == 3
    # same seed -> same subset; fewer credible than floor(alpha*b) -> all credible rows
    again = choose_rows(credible, alpha=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)
    few = torch.tensor([True] + [False] * 9)
    assert choose_rows(few, 0.5, torch.Generator().manual_seed(0)).tolist() == [0]


def test_mixbct_loss_matches_hand_reference() -> None:
    torch.manual_seed(0)
    b, d, c = 8, 5, 3
    new = torch.randn(b, d)
    old = torch.randn(b, d) * 3.0  # unnormalised on purpose: MixBCT L2-normalises the old rows
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    credible = torch.tensor([True, True, False, True, True, True, False, True])
    method = MixBCT(embedding_dim=d, num_classes=c, s=64.0, m=0.5, seed=123, args=MixBCTArgs(alpha=0.3))
    loss = method(new, labels, old, credible)["loss"]

    rows = choose_rows(credible, 0.3, torch.Generator().manual_seed(123)).numpy()  # the same draw, replayed
    assert len(rows) == 2
    mixed = new.numpy().copy()
    for r in rows:
        mixed[r] = old[r].numpy() / np.linalg.norm(old[r].numpy())
    expected = reference_arcface(mixed, method.head.weight.detach().numpy(), labels.numpy(), 64.0, 0.5)
    assert abs(loss.item() - expected) < 1e-4 * max(1.0, abs(expected))


def test_replaced_rows_send_no_gradient_to_backbone_but_w_learns_from_them() -> None:
    torch.manual_seed(1)
    b, d, c = 10, 4, 3
    backbone = torch.nn.Linear(6, d)
    x = torch.randn(b, 6)
    labels = torch.randint(0, c, (b,))
    old = torch.randn(b, d)
    credible = torch.ones(b, dtype=torch.bool)
    method = MixBCT(embedding_dim=d, num_classes=c, seed=7, args=MixBCTArgs(alpha=0.3))
    new = backbone(x)
    new.retain_grad()
    method(new, labels, old, credible)["loss"].backward()
    rows = choose_rows(credible, 0.3, torch.Generator().manual_seed(7))
    kept = torch.ones(b, dtype=torch.bool)
    kept[rows] = False
    assert torch.all(new.grad[rows] == 0), "replaced rows must be constants"
    assert torch.all(new.grad[kept].abs().sum(1) > 0)
    # W's gradient from the replaced rows alone: recompute the loss on old rows only and compare directions.
    head = ArcFaceHead(d, c)
    head.weight.data.copy_(method.head.weight.data)
    only_old = torch.nn.functional.normalize(old[rows], dim=1)
    head(only_old, labels[rows]).backward()
    assert head.weight.grad.abs().sum() > 0, "old rows must pull on the classifier"
    assert method.head.weight.grad is not None and method.head.weight.grad.abs().sum() > 0


def test_generator_state_resumes_the_same_draws() -> None:
    method = MixBCT(embedding_dim=2, num_classes=2, seed=3, args=MixBCTArgs(alpha=0.5))
    credible = torch.ones(16, dtype=torch.bool)
    choose_rows(credible, 0.5, method.generator)  # advance
    state = method.state_dict()
    first = choose_rows(credible, 0.5, method.generator)
    resumed = MixBCT(embedding_dim=2, num_classes=2, seed=999, args=MixBCTArgs(alpha=0.5))
    resumed.load_state_dict(state)
    assert torch.equal(first, choose_rows(credible, 0.5, resumed.generator))


def test_paragon_is_plain_arcface() -> None:
    torch.manual_seed(2)
    f, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    paragon = build_method("none", embedding_dim=4, num_classes=3)
    expected = reference_arcface(f.numpy(), paragon.head.weight.detach().numpy(), y.numpy(), 64.0, 0.5)
    assert abs(paragon(f, y)["loss"].item() - expected) < 1e-4 * max(1.0, expected)


def test_l2_weight_zero_is_mixbct_exactly_and_a_weight_adds_the_l2_term() -> None:
    """The shift study's "L2 + MixBCT": l2_weight 0 leaves MixBCT untouched; w > 0 adds w · mean ‖norm old − norm new‖."""
    from components.losses import build_method
    from components.losses.l2 import feature_distance

    torch.manual_seed(0)
    new, old = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    labels, credible = torch.randint(0, 5, (16,)), torch.ones(16, dtype=torch.bool)
    plain = build_method("mixbct", embedding_dim=8, num_classes=5, args={"alpha": 0.5})
    zero = build_method("mixbct", embedding_dim=8, num_classes=5, args={"alpha": 0.5, "l2_weight": 0.0})
    ten = build_method("mixbct", embedding_dim=8, num_classes=5, args={"alpha": 0.5, "l2_weight": 10.0})
    for m in (zero, ten):
        m.load_state_dict(plain.state_dict())
    a, b, c = (m(new, labels, old, credible) for m in (plain, zero, ten))
    assert torch.equal(a["loss"], b["loss"]) and "l2" not in b
    assert torch.allclose(c["loss"], c["cls"] + 10.0 * feature_distance(new, old).mean())
    assert torch.equal(c["cls"], a["cls"])


def test_skip_replaced_runs_the_backbone_on_kept_rows_only_and_changes_nothing_else() -> None:
    """Without BatchNorm a row's feature does not depend on the others: skipping the replaced rows then gives the
    same loss and the same gradients, from a backbone that saw b − floor(α·b) rows."""
    from components.task import Batch, CompatibleTask

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(12, 8)
            self.rows_seen: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.rows_seen.append(len(x))
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    x, old = torch.randn(20, 1, 3, 4), torch.randn(20, 8)
    labels, credible = torch.randint(0, 5, (20,)), torch.rand(20) < 0.8
    tasks = []
    for skip in (False, True):
        torch.manual_seed(1)
        backbone = Linear()
        method = build_method("mixbct", embedding_dim=8, num_classes=5, args={"alpha": 0.5, "skip_replaced": skip})
        tasks.append(CompatibleTask(backbone, method))
    tasks[1].load_state_dict(tasks[0].state_dict())
    outs = []
    for task in tasks:
        out = task(Batch(x=x, labels=labels, old=old, credible=credible))
        out["loss"].backward()
        outs.append(out)
    assert torch.allclose(outs[0]["loss"], outs[1]["loss"], atol=1e-6) and outs[0]["mixed_rows"] == outs[1]["mixed_rows"] == 10
    for a, b in zip(tasks[0].parameters(), tasks[1].parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert tasks[0].backbone.rows_seen == [20] and tasks[1].backbone.rows_seen == [10]
    # the generators stay in step: the next batch draws the same rows in both
    assert torch.equal(tasks[0].method.generator.get_state(), tasks[1].method.generator.get_state())


def test_the_l2_term_keeps_every_row_in_the_backbone_even_with_skip_replaced_on() -> None:
    """params.yaml turns skip_replaced on; `-S train.method_args.l2_weight=10` must still work (the L2 term reads
    every row's new feature), so the backbone then runs on every row."""
    both = build_method("mixbct", embedding_dim=8, num_classes=5, args={"alpha": 0.5, "skip_replaced": True,
                                                                         "l2_weight": 10.0})  # fmt: skip
    assert both.replaced_rows(torch.ones(16, dtype=torch.bool)) is None
    only = build_method("mixbct", embedding_dim=8, num_classes=5, args={"alpha": 0.5, "skip_replaced": True})
    assert only.replaced_rows(torch.ones(16, dtype=torch.bool)).numel() == 8
