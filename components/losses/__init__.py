"""Compatibility methods, one per file, built by name from one registry.

A method owns the new model's classifier (trained jointly, never exported) and turns a batch of new
features, labels and (when it needs them) old features into a loss. Backbones never see it.

Each method declares its own arguments as a frozen `MethodArgs` model in its file (defaults from method.md) and
registers one factory with it: `@register_method("mixbct", args=MixBCTArgs)`. The factory receives what every
method shares (embedding_dim, num_classes, ArcFace s and m, seed) plus its typed arguments; params.yaml's
`train.method_args` is validated against that model when the config is loaded, so a typo fails naming the field.

Where the MixBCT authors' re-implementation of a baseline differs from the original method (method.md,
"Baselines"), the original at its working scale is the method ("bct", "nccl", …) and the authors' variant is
registered beside it under its own name ("bct_authors", …) with `register_variant`, so that reports can label it:
`method_label(name)` and `is_authors_variant(name)`.

The BCT-style heads also take the old model's classifier, optionally, before `prepare()`:
`method.set_old_classifier(rows, known)` where `method.accepts_old_classifier` is true (see `CompatibilityMethod`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class MethodArgs(BaseModel):
    """Base of every method's own arguments: frozen; unknown keys and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


class NoArgs(MethodArgs):
    """A method without arguments of its own."""


class CompatibilityMethod(nn.Module):
    """Base class. `needs_old_features` tells the data side whether to load old features and the mask;
    `accepts_old_classifier` whether `set_old_classifier` may be called (BCT and UniBCT)."""

    needs_old_features: bool = False
    accepts_old_classifier: bool = False

    def forward(  # type: ignore[override]
        self,
        new: torch.Tensor,  # [b, d] new-model features (require grad)
        labels: torch.Tensor,  # [b] class indices of the new training set
        old: torch.Tensor | None = None,  # [b, d] frozen old-model features of the same images
        credible: torch.Tensor | None = None,  # [b] bool, MixBCT's denoising mask
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def replaced_rows(self, credible: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of the coming batch whose backbone output this method will not read (the task then skips them and
        passes them to forward as `rows`); None: every row is read."""
        return None

    def seed_step(self, seed: int) -> None:
        """Distributed training (components/distributed.py): reseed this method's random draws for the coming
        step from a seed per (seed, step, rank). A method without random draws ignores it."""

    def prepare(self, old: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Called once before training with the whole training set: old features [N, d] (or None), labels [N].

        Methods that need dataset-level state (class prototypes, queues) build it here.
        """

    def on_epoch_start(self, epoch: int, epochs: int, embed_train: Callable[[], torch.Tensor]) -> None:
        """Called before each epoch (0-based). `embed_train()` returns the current new features [N, d] of the
        whole training set in dataset order (eval mode, no grad): what prototype refinement needs."""

    def set_old_classifier(self, rows: torch.Tensor, known: torch.Tensor) -> None:
        """Give the method the old model's classifier, before `prepare()`: `rows` [C, d] holds, for each class k of
        the new training set, the old head's row of that identity (bias dropped); `known` [C] bool marks the classes
        the old model was trained on (only their rows are read). Only methods with `accepts_old_classifier`."""
        raise TypeError(f"{type(self).__name__} does not use the old classifier (accepts_old_classifier is False)")


class MethodFactory(Protocol):
    """What a registered factory is called with: the shared things, by keyword, and the method's typed args."""

    def __call__(
        self, *, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: Any
    ) -> CompatibilityMethod: ...


@dataclass(frozen=True)
class _Registered:
    factory: MethodFactory
    args: type[MethodArgs]


@dataclass(frozen=True)
class _Variant:
    of: str  # the corrected method it is a variant of
    label: str  # how reports name it


_METHODS: dict[str, _Registered] = {}
_VARIANTS: dict[str, _Variant] = {}
F = TypeVar("F", bound=MethodFactory)


def register_method(name: str, args: type[MethodArgs]) -> Callable[[F], F]:
    """Register `factory` under `name`, with `args` the model of its own arguments."""

    def wrap(factory: F) -> F:
        if name in _METHODS and _METHODS[name].factory is not factory:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = _Registered(factory, args)
        return factory

    return wrap


def register_variant(name: str, *, of: str, label: str) -> None:
    """Mark registered method `name` as the MixBCT authors' (or another published) variant of method `of`, named
    `label` in reports, e.g. "BCT (MixBCT authors' variant: unscaled logits)"."""
    if name in _VARIANTS and _VARIANTS[name] != _Variant(of, label):
        raise ValueError(f"variant {name!r} is already registered")
    _VARIANTS[name] = _Variant(of, label)


def _load_all() -> None:
    # Importing the modules registers them; kept lazy so `components.losses` has no import-time cost.
    from components.losses import advbct, bct, l2, lce, mixbct, nccl, none, unibct, weakened_l2  # noqa: F401


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def _registered(name: str) -> _Registered:
    _load_all()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def is_authors_variant(name: str) -> bool:
    """True for a labelled variant (e.g. "bct_authors"), False for a method as method.md defines it."""
    _registered(name)
    return name in _VARIANTS


def variant_of(name: str) -> str | None:
    """The corrected method a variant belongs to ("bct_authors" -> "bct"); None for a method itself."""
    _registered(name)
    return _VARIANTS[name].of if name in _VARIANTS else None


def method_label(name: str) -> str:
    """How reports name method `name`: the variant's label, or the plain name for a method itself."""
    _registered(name)
    return _VARIANTS[name].label if name in _VARIANTS else name


def method_args_model(name: str) -> type[MethodArgs]:
    """The model of method `name`'s own arguments (what `train.method_args` is validated against)."""
    return _registered(name).args


def build_method(
    name: str,
    *,
    embedding_dim: int,
    num_classes: int,
    s: float = 64.0,
    m: float = 0.5,
    seed: int = 0,
    args: Mapping[str, Any] | MethodArgs | None = None,
) -> CompatibilityMethod:
    """Method `name` with its own `args` (a mapping validated by its model, or the model itself; None: defaults)."""
    registered = _registered(name)
    if isinstance(args, MethodArgs) and not isinstance(args, registered.args):
        raise TypeError(f"method {name!r} takes {registered.args.__name__}, got {type(args).__name__}")
    typed = args if isinstance(args, registered.args) else registered.args.model_validate(dict(args or {}))
    return registered.factory(embedding_dim=embedding_dim, num_classes=num_classes, s=s, m=m, seed=seed, args=typed)
