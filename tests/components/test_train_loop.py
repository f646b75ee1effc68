"""The training loop: loss decreases, every parameter learns, resume is exact, checkpoints hold no head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.embed import load_backbone, save_backbone
from components.losses import build_method
from components.models import build_backbone
from components.task import CompatibleTask
from components.train import LoopConfig, fit, poly_lr

from train_kit import toy_arrays


def _task(method: str = "mixbct", d: int = 8) -> tuple[CompatibleTask, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", d, 16)
    method_args = {"alpha": 0.3} if method == "mixbct" else {}
    task = CompatibleTask(backbone, build_method(method, embedding_dim=d, num_classes=4, seed=0, args=method_args))
    return task, backbone


def test_poly_schedule_is_quadratic() -> None:
    assert poly_lr(0.1, 0, 100) == 0.1
    assert abs(poly_lr(0.1, 50, 100) - 0.025) < 1e-12
    assert poly_lr(0.1, 100, 100) == 0.0


def test_loss_decreases_and_every_parameter_gets_gradient(tmp_path: Path) -> None:
    task, backbone = _task()
    history = fit(task, backbone, toy_arrays(), LoopConfig(epochs=4, batch_size=16, lr=0.05), tmp_path / "ck.pt")
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(np.isfinite(h["loss"]) for h in history)
    # one more backward on a fresh batch: every trainable tensor of backbone and head receives gradient
    task.zero_grad()
    data = toy_arrays()
    from components.task import Batch
    from components.preprocess import to_input

    out = task(Batch(to_input(torch.from_numpy(data.images[:16])), torch.from_numpy(data.labels[:16]),
                     torch.from_numpy(data.old[:16]), torch.ones(16, dtype=torch.bool)))  # fmt: skip
    out["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


def test_resume_reaches_the_same_state(tmp_path: Path) -> None:
    cfg = LoopConfig(epochs=3, batch_size=16, lr=0.05, seed=1)
    full, fb = _task()
    fit(full, fb, toy_arrays(), cfg, tmp_path / "full.pt")
    # stop after 1 epoch, then resume from that checkpoint with freshly built objects
    interrupted, ib = _task()
    ck = tmp_path / "interrupted.pt"
    import components.train as train_mod

    class Stop(Exception):
        pass

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise Stop

    try:
        fit(interrupted, ib, toy_arrays(), cfg, ck, on_epoch=stop_after_first)
    except Stop:
        pass
    assert torch.load(ck, weights_only=True)["epoch"] == 1
    resumed, rb = _task()
    train_mod.fit(resumed, rb, toy_arrays(), cfg, ck)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-6), name


def test_saved_backbone_has_no_classifier_or_old_weights(tmp_path: Path) -> None:
    task, backbone = _task()
    old = build_backbone("small_cnn", 8, 16)  # a frozen old model must never leak into the new checkpoint
    save_backbone(backbone, tmp_path / "model.pt", "small_cnn", 8, 16)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    keys = set(payload["state_dict"])
    assert keys == set(backbone.state_dict())
    assert not any("head" in k or "method" in k for k in keys)
    head_weight = task.method.head.weight.detach()
    assert all(v.shape != head_weight.shape or not torch.equal(v, head_weight) for v in payload["state_dict"].values())
    old_values = list(old.state_dict().values())
    for v in payload["state_dict"].values():
        if v.is_floating_point() and v.dim() >= 2:  # randomly initialised weights (BN starts at 1/0)
            assert not any(o.shape == v.shape and torch.equal(o, v) for o in old_values)
    model, meta = load_backbone(tmp_path / "model.pt")
    assert meta == {"arch": "small_cnn", "embedding_dim": 8, "image_size": 16}
    assert not any(p.requires_grad for p in model.parameters())


def test_old_features_are_read_whole_only_by_methods_with_dataset_state() -> None:
    """MixBCT keeps no dataset-level state: its training reads old features a batch at a time (streaming), while
    BCT builds its class prototypes from all of them once."""

    class Unreadable:
        shape = (6, 4)

        def __len__(self) -> int:
            return 6

        def __array__(self, dtype=None, copy=None):
            raise AssertionError("the old features were read whole")

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    backbone = build_backbone("small_cnn", 4, 32)
    CompatibleTask(backbone, build_method("mixbct", embedding_dim=4, num_classes=3)).prepare(Unreadable(), labels)
    bct = CompatibleTask(backbone, build_method("bct", embedding_dim=4, num_classes=3))
    with pytest.raises(AssertionError, match="read whole"):
        bct.prepare(Unreadable(), labels)
    old = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    bct.prepare(old, labels)
    assert bool(bct.method.prepared)
