"""Training-time style augmentation (`train.augment: style`), for the shift study of issue "A comparison a reviewer
would trust" (item 7): does making the new model see other "handwritings" keep compatibility under a style shift?

`style_jitter` acts on a preprocessed batch [b, C, H, W] (or NHWC), each image with its own seeded draw:
  - a random affine map: rotation ±10°, horizontal shear ±0.2, scale 0.9–1.1, translation ±6% of the size;
  - a stroke-width change: a 3×3 dilation of the ink, an erosion, or neither (one third each).
The background (the median of the image's border) fills what the map uncovers, and the ink is whatever differs from
it, so white-on-black glyphs and dark-on-light photos are handled alike. Nothing here is in the paper; it is a
candidate remedy measured on the validation split.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "style")
Augment = Literal["none", "style"]

ROTATION_DEG, SHEAR, SCALE, SHIFT = 10.0, 0.2, 0.1, 0.06


def _uniform(n: int, half: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * half


def _background(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the median of the border pixels: [b, C, 1, 1]."""
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # [b, C, 2H + 2W]
    return border.median(dim=2).values[:, :, None, None]


def style_jitter(x: torch.Tensor, generator: torch.Generator, layout: str = "nchw") -> torch.Tensor:
    """A new batch: each image of `x` (float, preprocessed) under its own random affine map and stroke change."""
    if x.ndim != 4:
        raise ValueError(f"style_jitter expects a batch [b, C, H, W] or [b, H, W, C], got {tuple(x.shape)}")
    nchw = x if layout == "nchw" else x.permute(0, 3, 1, 2)
    b = nchw.shape[0]
    angle = _uniform(b, math.radians(ROTATION_DEG), generator)
    shear = _uniform(b, SHEAR, generator)
    scale = 1 + _uniform(b, SCALE, generator)
    shift = _uniform(2 * b, 2 * SHIFT, generator).reshape(b, 2)  # normalised coordinates span [-1, 1]
    stroke = torch.randint(0, 3, (b,), generator=generator)  # 0 none, 1 dilate, 2 erode
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)  # output -> input coordinates
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear * cos
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos + shear * sin
    theta[:, :, 2] = shift
    bg = _background(nchw)
    grid = F.affine_grid(theta.to(nchw.dtype), list(nchw.shape), align_corners=False)
    out = F.grid_sample(nchw - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
    # ink brighter than the background: dilation is a max filter; darker: a min filter
    bright = (nchw.mean(dim=(2, 3), keepdim=True) >= bg).to(nchw.dtype) * 2 - 1  # +1 / -1 per image and channel
    signed = out * bright
    dilated = F.max_pool2d(signed, 3, stride=1, padding=1) * bright
    eroded = -F.max_pool2d(-signed, 3, stride=1, padding=1) * bright
    pick = stroke[:, None, None, None]
    out = torch.where(pick == 1, dilated, torch.where(pick == 2, eroded, out))
    return out.contiguous() if layout == "nchw" else out.permute(0, 2, 3, 1).contiguous()
