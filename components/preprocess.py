"""What every model sees: how stored images become network input (training, extraction, ONNX parity)."""

from __future__ import annotations

import torch


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [b, H, W] -> float [b, 1, H, W] in [-1, 1]."""
    return (images.float() / 127.5 - 1.0).unsqueeze(1)
