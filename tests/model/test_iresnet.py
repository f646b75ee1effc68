"""insightface's IResNet backbones: its sizes, its frozen embedding scale, training, determinism and ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.iresnet import ARCHS, IResNet
from components.models import available_archs, build_backbone, count_parameters

torch.set_num_threads(1)


def _build(arch: str, embedding_dim: int, image_size: int, in_channels: int = 1) -> torch.nn.Module:
    """The factory build_backbone calls, taken from components.iresnet itself."""
    return ARCHS[arch](embedding_dim=embedding_dim, image_size=image_size, in_channels=in_channels)


def _batch(b: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _calibrate(model: torch.nn.Module, *batches: torch.Tensor) -> torch.nn.Module:
    """Set every BatchNorm's running statistics to the exact average over `batches`, then switch to eval.

    insightface's init (conv weights N(0, 0.1), no BN after the residual sum) makes the residual stream grow with
    depth, so eval mode at the default running statistics (mean 0, var 1) is far off scale, even inf/NaN for
    iresnet100; a trained model's statistics keep it on scale, and this stands in for that.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval()


def test_registered_by_name() -> None:
    """components.models registers the iresnet archs: build_backbone and the config validation know them."""
    assert set(ARCHS) <= set(available_archs())
    model = build_backbone("iresnet18", 8, 32, in_channels=3)
    assert isinstance(model, IResNet) and model.fc.out_features == 8 and model.conv1.in_channels == 3


@pytest.mark.parametrize(
    ("arch", "insightface_count", "published"),
    [
        # insightface_count: arcface_torch's own backbones/iresnet.py instantiated with its defaults
        # (3 x 112 x 112, num_features=512); published: the size quoted for r18 / r50 (24.0M, 43.6M)
        ("iresnet18", 24_025_600, 24.0e6),
        ("iresnet50", 43_590_848, 43.6e6),
    ],
)
def test_parameter_count_matches_insightface(arch: str, insightface_count: int, published: float) -> None:
    n = count_parameters(_build(arch, 512, 112, in_channels=3))
    assert n == insightface_count
    assert abs(n - published) / published < 0.005


def test_state_dict_uses_insightface_names() -> None:
    """Same module names as arcface_torch, so its checkpoints load into (3, 112) models."""
    keys = set(_build("iresnet18", 512, 112, in_channels=3).state_dict())
    for key in (
        "conv1.weight",
        "prelu.weight",
        "layer1.0.bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.1.prelu.weight",
        "layer4.1.bn3.running_mean",
        "bn2.weight",
        "fc.weight",
        "features.weight",
        "features.running_var",
    ):
        assert key in keys, key


@pytest.mark.parametrize(
    ("arch", "image_size", "in_channels"),
    [
        ("iresnet18", 112, 3),
        ("iresnet18", 32, 1),
        ("iresnet34", 32, 1),
        ("iresnet50", 32, 1),
        ("iresnet100", 32, 1),
    ],
)
def test_output_shape(arch: str, image_size: int, in_channels: int) -> None:
    model = _build(arch, 24, image_size, in_channels=in_channels)
    x = _batch(2, image_size, in_channels)
    with torch.no_grad():
        out = model.train()(x)  # batch statistics
        assert out.shape == (2, 24) and torch.isfinite(out).all()
        out = _calibrate(model, _batch(4, image_size, in_channels, seed=1))(x)  # running statistics
    assert out.shape == (2, 24) and torch.isfinite(out).all()


def test_refuses_image_size_not_divisible_by_16() -> None:
    with pytest.raises(ValueError, match=r"iresnet50.*image_size 100"):
        _build("iresnet50", 512, 100, in_channels=3)


def test_embedding_scale_frozen_at_one() -> None:
    model = _build("iresnet18", 16, 32, in_channels=3)
    scale = model.features.weight
    assert not scale.requires_grad
    assert torch.equal(scale, torch.ones(16))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert id(scale) not in trainable
    assert id(model.features.bias) in trainable, "only the scale is frozen, the shift learns"


def test_one_sgd_step_trains_and_stays_finite() -> None:
    torch.manual_seed(0)
    model = _build("iresnet18", 16, 32, in_channels=3).train()
    x, target = _batch(), torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=5e-4)

    loss = torch.nn.functional.mse_loss(model(x), target)
    loss.backward()
    # every trainable parameter is reached (a bias feeding a train-mode BN gets ~0 analytically, but a gradient)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.features.weight.grad is None
    opt.step()

    after = dict(model.named_parameters())
    weights = [n for n in after if n.endswith("weight") and after[n].requires_grad and after[n].dim() > 1]
    weights += [n for n in after if n.endswith("prelu.weight")] + ["features.bias"]
    unchanged = [n for n in weights if torch.equal(after[n], before[n])]
    assert not unchanged, f"not updated: {unchanged}"
    assert torch.equal(after["features.weight"], torch.ones(16)), "weight decay must not touch the frozen scale"
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all()
        assert torch.nn.functional.mse_loss(out, target) < loss, "one small step on the same batch lowers the loss"
        assert torch.isfinite(model.eval()(x)).all()


def test_eval_is_deterministic_and_batch_independent() -> None:
    torch.manual_seed(0)
    model = _build("iresnet18", 16, 32, in_channels=3)
    x = _batch()
    _calibrate(model, _batch(seed=1), _batch(seed=2))
    with torch.no_grad():
        a, b = model(x), model(x)
        alone = model(x[:1])
    assert torch.equal(a, b)
    # eval BatchNorm uses running statistics: a sample's embedding does not depend on its batch
    torch.testing.assert_close(alone, a[:1], rtol=1e-5, atol=1e-5)


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    """A 3-channel export, through the project's export_onnx and OnnxEmbedder (its preprocess in the metadata)."""
    from components.embed import OnnxEmbedder, export_onnx
    from components.preprocess import Preprocess

    torch.manual_seed(0)
    model = _build("iresnet18", 64, 32, in_channels=3)
    _calibrate(model, *(_batch(seed=seed) for seed in range(3)))  # non-trivial BatchNorm statistics
    path = export_onnx(model, tmp_path / "m.onnx", Preprocess(size=32, channels=3))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "weights must live inside the one file"
    embedder = OnnxEmbedder(path, threads=1)
    assert embedder.session.get_inputs()[0].shape[1:] == [3, 32, 32] and embedder.preprocess.channels == 3
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)  # batch 4 != traced 2
    got = embedder(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (4, 64)
    assert np.max(np.abs(got - ref)) < 1e-4
