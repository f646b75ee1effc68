"""Compatibility methods, one per file, built by name from one registry.

A method owns the new model's classifier (trained jointly, never exported) and turns a batch of new
features, labels and (when it needs them) old features into a loss. Backbones never see it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_METHODS: dict[str, Callable[..., CompatibilityMethod]] = {}


class CompatibilityMethod(nn.Module):
    """Base class. `needs_old_features` tells the data side whether to load old features and the mask."""

    needs_old_features: bool = False

    def forward(  # type: ignore[override]
        self,
        new: torch.Tensor,  # [b, d] new-model features (require grad)
        labels: torch.Tensor,  # [b] class indices of the new training set
        old: torch.Tensor | None = None,  # [b, d] frozen old-model features of the same images
        credible: torch.Tensor | None = None,  # [b] bool, MixBCT's denoising mask
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Called once before training with the whole training set: old features [N, d] (or None), labels [N].

        Methods that need dataset-level state (class prototypes, queues) build it here.
        """

    def on_epoch_start(self, epoch: int, epochs: int, embed_train: Callable[[], torch.Tensor]) -> None:
        """Called before each epoch (0-based). `embed_train()` returns the current new features [N, d] of the
        whole training set in dataset order (eval mode, no grad): what prototype refinement needs."""


def register_method(name: str) -> Callable[[Callable[..., CompatibilityMethod]], Callable[..., CompatibilityMethod]]:
    def wrap(factory: Callable[..., CompatibilityMethod]) -> Callable[..., CompatibilityMethod]:
        _METHODS[name] = factory
        return factory

    return wrap


def _load_all() -> None:
    # Importing the modules registers them; kept lazy so `components.losses` has no import-time cost.
    from components.losses import advbct, bct, l2, lce, mixbct, nccl, none, unibct, weakened_l2  # noqa: F401


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def build_method(name: str, **kwargs: Any) -> CompatibilityMethod:
    _load_all()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](**kwargs)
