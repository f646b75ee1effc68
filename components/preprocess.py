"""What every model sees: how stored pixels become network input, declared per model, never hard-coded.

A `Preprocess` says what one model takes: input size, channels, channel order (RGB/BGR), mean/std (in 0..255 pixel
units) and layout (NCHW/NHWC). Stored images are uint8, [H, W] (grayscale) or [H, W, 3] (RGB), at the dataset's
size (data.image_size, data.channels); a model's preprocess converts them: channels (gray -> RGB repeats the plane,
RGB -> gray is PIL's ITU-R 601-2 luma), size (PIL bilinear, as the ImageFolder reader resizes), order, then

    x = pixel / std - mean / std

so the embedded default (1 channel, mean = std = 127.5) is exactly `pixel / 127.5 - 1`, the [-1, 1] scaling the
MixBCT authors' recipe uses (method.md), bit for bit what this project computed before preprocessing was declared.
insightface's face models use the same scaling on 112x112 RGB ((x - 127.5) / 127.5 up to rounding).

Every exported ONNX carries its preprocess in the model's metadata (`mixbct.preprocess`, JSON), so a version pulled
from the registry says how to feed it; a user's ONNX old model is read from `old.preprocess`, else from that metadata,
else from data.* with the model's declared input shape checked against it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # torch is imported where tensors are made: params.yaml loads without it
    import torch

METADATA_KEY = "mixbct.preprocess"  # ONNX metadata_props key holding Preprocess.to_json()


class Preprocess(BaseModel):
    """One model's input contract."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    size: tuple[int, int] | None = Field(None, description="input (height, width); null: the stored images' own size")
    channels: Literal[1, 3] = 1
    order: Literal["rgb", "bgr"] = "rgb"  # channel order of a 3-channel input (ignored for 1 channel)
    mean: tuple[float, ...] = (127.5,)  # per channel (or one for all), pixel units 0..255
    std: tuple[float, ...] = (127.5,)
    layout: Literal["nchw", "nhwc"] = "nchw"

    @model_validator(mode="before")
    @classmethod
    def _square(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("size"), int):  # `size: 112` means 112 x 112
            data = {**data, "size": (data["size"], data["size"])}
        return data

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocess:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{key}: {len(values)} values for {self.channels} channel(s); give 1 or {self.channels}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: every value must be > 0, got {list(self.std)}")
        if self.size is not None and min(self.size) < 1:
            raise ValueError(f"size: must be positive, got {list(self.size)}")
        return self

    # ------------------------------------------------------------------------------------------ shape

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) for NCHW, (H, W, C) for NHWC: one sample, batch dimension left out."""
        if self.size is None:
            raise ValueError("this preprocess takes images at their own size: no fixed input shape")
        h, w = self.size
        return (self.channels, h, w) if self.layout == "nchw" else (h, w, self.channels)

    @property
    def square(self) -> int:
        """The side of a square input; ValueError for a rectangular or free one (the project's backbones are square)."""
        if self.size is None:
            raise ValueError("input size is free (null)")
        h, w = self.size
        if h != w:
            raise ValueError(f"input size {h}x{w} is not square")
        return h

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        return cls.model_validate(json.loads(text))

    # ------------------------------------------------------------------------------------------ apply

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [b, H, W] or [b, H, W, 3] -> uint8 [b, h, w, C] at this model's size, channels and order."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise ValueError(f"expected uint8 [b, H, W] or [b, H, W, 3] images, got {images.dtype} {images.shape}")
        if images.ndim == 4 and images.shape[3] == 1:
            images = images[..., 0]
        stored_channels = 1 if images.ndim == 3 else 3
        h, w = self.size if self.size is not None else images.shape[1:3]
        if images.shape[1:3] != (h, w) or stored_channels != self.channels:
            mode = "L" if self.channels == 1 else "RGB"
            out = np.empty((len(images), h, w) + ((3,) if self.channels == 3 else ()), dtype=np.uint8)
            for i, image in enumerate(images):
                im = Image.fromarray(image).convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
                out[i] = np.asarray(im, dtype=np.uint8)
            images = out
        if images.ndim == 3:
            images = images[..., None]  # [b, h, w, 1]
        if self.channels == 3 and self.order == "bgr":
            images = images[..., ::-1]
        return images

    def array(self, images: np.ndarray) -> np.ndarray:
        """Stored uint8 pixels -> float32 model input [b, C, h, w] (or [b, h, w, C] for NHWC), C-contiguous.

        numpy, single-threaded: torch's OpenMP pool would spin on both cores after each batch and slow the ONNX
        session that runs next (measured: extraction at 0.48 of the model's own throughput). float32 division and
        subtraction round the same in numpy and torch, so the default is `pixel / 127.5 - 1` bit for bit (tested).
        """
        x = self._pixels(np.asarray(images)).astype(np.float32)  # [b, h, w, C]
        std = np.asarray(self.std, dtype=np.float32)
        shift = np.asarray(self.mean, dtype=np.float32) / std
        x /= std if len(self.std) > 1 else std[0]
        x -= shift if len(self.std) > 1 else shift[0]
        if self.layout == "nhwc":
            return x
        if x.shape[3] == 1:  # reshape, not transpose: full C strides, so torch never sees a channels-last layout
            return x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`array` as a torch tensor with standard NCHW strides (a permuted 1-channel tensor would count as
        channels-last, and convolutions would then sum floats in another order)."""
        import torch

        if isinstance(images, torch.Tensor):
            images = images.numpy()
        return torch.from_numpy(self.array(images))


def default_preprocess(image_size: int, channels: int = 1) -> Preprocess:
    """What the project's own models take when params say nothing: the dataset's stored size and channels,
    scaled to [-1, 1]."""
    return Preprocess(size=(image_size, image_size), channels=channels)  # type: ignore[arg-type]


def to_input(images: torch.Tensor) -> torch.Tensor:  # noqa: F821 (torch: TYPE_CHECKING import)
    """uint8 [b, H, W] -> float [b, 1, H, W] in [-1, 1]: the default preprocess at the images' own size."""
    return (images.float() / 127.5 - 1.0).unsqueeze(1)
