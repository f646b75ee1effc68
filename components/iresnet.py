"""insightface's IResNet backbones (iresnet18/34/50/100), built by name beside the small ones in models.py.

The face-scale pair of method.md: IResNet-18 old, IResNet-50 new. The architecture follows insightface's
arcface_torch `recognition/arcface_torch/backbones/iresnet.py` (Deng et al., *ArcFace: Additive Angular Margin
Loss for Deep Face Recognition*, CVPR 2019; github.com/deepinsight/insightface) layer for layer, with its module
names, so a state dict trained there loads here for in_channels = 3 and image_size = 112. Two departures, both at
the edges: the input channels and image size are arguments (insightface hard-codes 3 channels and an FC input of
512 * 7 * 7, i.e. 112 x 112); and there is no `fp16` autocast inside `forward` (mixed precision is the training
loop's job). timm ships no IResNet (its model registry has no insightface IResNet / IBasicBlock / PReLU network),
hence this copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

STRIDE = 16  # four stride-2 stages: image_size // 16 is the side of the last feature map


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut.

    No activation after the addition (pre-activation style with a BN first), as in insightface.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-05)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-05)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """Stem (conv3x3, stride 1) -> four IBasicBlock stages (64-128-256-512, each opening with stride 2) -> output.

    Output: BN2d(512) -> flatten -> Dropout -> FC(512 * s * s -> d) -> BN1d(d) with its scale frozen at 1,
    s = image_size // 16. Raw (unnormalised) embeddings, like the other backbones.

    As in insightface, a fresh model in eval mode is far off scale: with conv weights N(0, 0.1) and no BN after the
    residual sum, the stream grows with depth, and at the default running statistics (mean 0, var 1) the output
    reaches ~1e2 (iresnet18) to inf/NaN (iresnet100). Trained running statistics bring it back to scale.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_dim: int,
        image_size: int,
        in_channels: int = 1,
        dropout: float = 0.0,
        arch: str = "iresnet",
    ) -> None:
        super().__init__()
        if image_size < STRIDE or image_size % STRIDE:
            raise ValueError(
                f"{arch}: image_size {image_size} must be a positive multiple of {STRIDE} "
                f"(four stride-2 stages; insightface uses 112)"
            )
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        cin = 64
        stages: list[nn.Sequential] = []
        for width, blocks in zip((64, 128, 256, 512), layers, strict=True):
            stages.append(self._make_layer(cin, width, blocks))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        side = image_size // STRIDE
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(512 * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-05)
        # insightface freezes the embedding BN's scale at 1: only its shift (and running statistics) move
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        # insightface's init: conv weights N(0, 0.1); BN2d scale 1, shift 0;
        # FC, PReLU (0.25) and BN1d keep torch defaults
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def _make_layer(cin: int, cout: int, blocks: int) -> nn.Sequential:
        # every stage opens with stride 2, so the first block always needs a projection shortcut
        downsample = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=1, stride=2, bias=False), nn.BatchNorm2d(cout, eps=1e-05)
        )
        return nn.Sequential(
            IBasicBlock(cin, cout, stride=2, downsample=downsample),
            *(IBasicBlock(cout, cout) for _ in range(blocks - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W], normalised
        x = self.prelu(self.bn1(self.conv1(x)))  # [B, 64, H, W]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 512, H/16, W/16]
        x = self.dropout(torch.flatten(self.bn2(x), 1))  # [B, 512 * s * s]
        return self.features(self.fc(x))  # [B, d]


LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def iresnet18(embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    return IResNet(LAYERS["iresnet18"], embedding_dim, image_size, in_channels, arch="iresnet18")


def iresnet34(embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    return IResNet(LAYERS["iresnet34"], embedding_dim, image_size, in_channels, arch="iresnet34")


def iresnet50(embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    return IResNet(LAYERS["iresnet50"], embedding_dim, image_size, in_channels, arch="iresnet50")


def iresnet100(embedding_dim: int, image_size: int, in_channels: int = 1) -> nn.Module:
    return IResNet(LAYERS["iresnet100"], embedding_dim, image_size, in_channels, arch="iresnet100")


# Registered by components.models (`_ARCHS.update(ARCHS)`): importing the registry from here instead would make
# models <-> iresnet an import cycle, which the acyclic-components contract (tests/test_layering.py) refuses.
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
}
