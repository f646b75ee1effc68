"""Embedding backbones, built by name.

The embedded default's old model is a small CNN, its new one a larger residual CNN with the same embedding
dimension (method.md: IResNet-18 old vs IResNet-50 new at face scale, scaled here to 2 CPU cores); the face pair
itself is `iresnet18` / `iresnet50` (components/iresnet.py).
Backbones output raw (unnormalised) embeddings; heads and retrieval normalise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from components.iresnet import ARCHS as IRESNET_ARCHS

_ARCHS: dict[str, Callable[..., nn.Module]] = {}


def register_arch(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHS[name] = fn
        return fn

    return wrap


_ARCHS.update(IRESNET_ARCHS)  # insightface's iresnet18 / 34 / 50 / 100 (the face pair: 18 old, 50 new)


def available_archs() -> list[str]:
    return sorted(_ARCHS)


def build_backbone(arch: str, embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    """A backbone taking float [B, in_channels, image_size, image_size] (components.preprocess) to [B, d]."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(available_archs())}")
    return _ARCHS[arch](embedding_dim=embedding_dim, image_size=image_size, in_channels=in_channels)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class EmbeddingOutput(nn.Module):
    """insightface-style output layer: BN -> flatten -> FC -> BN1d (the embedding)."""

    def __init__(self, channels: int, spatial: int, embedding_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.bn(x), 1)))  # [B, d]


class SmallCNN(nn.Module):
    """Three conv stages (16-32-64 channels), each halving the resolution."""

    def __init__(
        self, embedding_dim: int, image_size: int, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            layers += [_conv_bn(cin, w), nn.MaxPool2d(2)]
            cin = w
        self.body = nn.Sequential(*layers)
        self.output = EmbeddingOutput(cin, image_size // 2 ** len(widths), embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W], normalised
        return self.output(self.body(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


class ResNetSmall(nn.Module):
    """A residual CNN: stem, then stages of BasicBlocks (32-64-128 channels), each stage halving resolution."""

    def __init__(
        self,
        embedding_dim: int,
        image_size: int,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        stages: list[nn.Module] = []
        cin = widths[0]
        for w, n in zip(widths, blocks, strict=True):
            stages.append(BasicBlock(cin, w, stride=2))
            stages += [BasicBlock(w, w, stride=1) for _ in range(n - 1)]
            cin = w
        self.body = nn.Sequential(*stages)
        self.output = EmbeddingOutput(cin, image_size // 2 ** len(widths), embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W], normalised
        return self.output(self.body(self.stem(x)))


@register_arch("small_cnn")
def small_cnn(embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    return SmallCNN(embedding_dim, image_size, in_channels=in_channels)


@register_arch("resnet_small")
def resnet_small(embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    return ResNetSmall(embedding_dim, image_size, in_channels=in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
