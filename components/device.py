"""Where training runs and in what precision (`runtime.device`, `runtime.precision`, `runtime.channels_last`).

- device: auto (CUDA when torch sees a GPU, else CPU) | cpu | cuda. Asking for cuda without one is refused,
  naming the setting.
- precision: auto (bf16 autocast on a GPU that supports it, else fp16 with a gradient scaler; fp32 on the CPU) |
  fp32 | bf16 | fp16. Weights, optimizer state and checkpoints stay fp32 (autocast only lowers the matmuls and
  convolutions), so a checkpoint written on one device and precision resumes on another. fp16 scales the loss
  (torch.amp.GradScaler) so small gradients do not underflow; bf16 has fp32's range and needs none. fp16 on the
  CPU is refused (no CPU kernels worth using).
- channels_last: null = on for CUDA (tensor cores prefer NHWC), off on the CPU.
- compile: torch.compile (inductor) the backbone while it trains; its weights, checkpoints and exports are the
  plain module's. Off by default: it pays on long trainings (benchmarks/run.py flops) but changes float rounding.

Everything random in the loop draws from CPU generators (epoch order, flips, augmentation, MixBCT's rows), so the
same seed gives the same batches and the same replaced rows on every device; only float rounding differs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from components.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved)
    channels_last: bool
    compile: bool = False  # runtime.compile: torch.compile the backbone for training (components.train.fit)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler that is a no-op unless fp16 (enabled=False passes everything through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        m = m.to(self.device)
        return m.to(memory_format=torch.channels_last) if self.channels_last else m

    def describe(self) -> str:
        return f"{self.device.type}, {self.precision}" + (", channels_last" if self.channels_last else "")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def place(
    device: Device = "auto", precision: Precision = "auto", channels_last: bool | None = None, compile: bool = False
) -> Placement:
    """Resolve runtime.device / runtime.precision / runtime.channels_last / runtime.compile against this machine."""
    if device == "cuda" and not cuda_available():
        raise ConfigError("runtime.device: cuda asked for, but torch sees no CUDA device (use auto or cpu)")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and cuda_available()) else "cpu")
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("runtime.precision: fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if channels_last is None:
        channels_last = dev.type == "cuda"
    return Placement(dev, precision, bool(channels_last), bool(compile))



_CURRENT: Placement | None = None


def set_placement(placement: Placement | None) -> None:
    """The placement training uses in this process from now on (pipeline.run sets it from runtime.*)."""
    global _CURRENT
    _CURRENT = placement


def current_placement() -> Placement:
    return _CURRENT if _CURRENT is not None else place("cpu", "fp32", False)
