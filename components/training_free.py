"""Training-free compatibility baselines: the paragon reused, with a map fitted on a support set into the old space.

method.md, "Training-free baselines". A support set is a set of training images embedded by both models:
`new` [n, d_new] (the paragon φ*) and `old` [n, d_old] (φ_old), rows in the same image order. Nothing is trained
by gradient descent; every fit is closed form and deterministic (the same features give the same map, bit for bit,
on one machine).

- Procrustes (orthogonal alignment; Schönemann, "A generalized solution of the orthogonal Procrustes problem",
  Psychometrika 31(1), 1966): with V = norm(new), U = norm(old) (rows L2-normalised) and Vᵀ U = P Σ Qᵀ,
  R = P Qᵀ minimises ‖V R − U‖_F over orthogonal R. A query is norm(norm(φ*(x)) R); the gallery is untouched.
- SLERP (Ricci, Biondi, Pernici, NeurIPS 2026, arXiv 2609.39836): u = norm φ_old(x), v = norm(norm(φ*(x)) R),
  θ = ∠(u, v), q = (sin((1 − a)θ) u + sin(aθ) v) / sin θ. a = 0 is the old model, a = 1 is Procrustes; a is
  chosen on a validation split by the caller's score. Two forward passes per query (both models in one graph).
- Query adapter (Drift-Adapter, Vejendla, EMNLP 2025, arXiv 2509.23471): an affine map from the new space to the
  old one learned on the support set. Drift-Adapter trains a low-rank affine map (or a small residual MLP) by
  gradient descent; here the affine map is full rank and fit in closed form by ridge regression on L2-normalised
  rows (`fit_adapter`), which is deterministic and has no learning rate, epochs or seed to tune.

Each fitted map becomes one torch module (`MappedEmbedder`, `SlerpEmbedder`): float [n, 1, H, W] in [-1, 1] ->
L2-normalised [n, d_old], all map tensors frozen buffers, always in eval mode, exportable as one ONNX graph by
`components.embed.export_onnx` and saved by `components.embed.save_composite`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from components.losses import MethodArgs

# (new [n, d_new], old [n, d_old]) raw features of the same images -> the composite's embeddings [n, d_out]:
# what the exported module computes on images, computed on features already extracted (validation, evaluation).
FeatureMap = Callable[[np.ndarray, np.ndarray], np.ndarray]

DEFAULT_GRID: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))  # 0, 0.1, ..., 1
_EPS = 1e-12  # L2 normalisation floor, as torch.nn.functional.normalize
_COS_EPS = 1e-6  # the cosine is clamped into [-1 + eps, 1 - eps]; above 1 - eps the linear limit is used


# ----------------------------------------------------------------------------------------------- fitting (numpy)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(‖row‖₂, 1e-12), in float64 (the same floor as torch's F.normalize)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _check_pair(new: np.ndarray, old: np.ndarray) -> None:
    if new.ndim != 2 or old.ndim != 2 or len(new) != len(old):
        raise ValueError(f"support features must be [n, d_new] and [n, d_old] rows of the same images, got "
                         f"{new.shape} and {old.shape}")  # fmt: skip
    if len(new) < 2:
        raise ValueError(f"a support set needs at least 2 images, got {len(new)}")
    if not (np.isfinite(new).all() and np.isfinite(old).all()):
        raise ValueError("support features hold NaN or infinite values")


def fit_procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Orthogonal Procrustes (Schönemann 1966): R [d_new, d_old] with norm(new) R ≈ norm(old).

    V = norm(new) [n, d_new], U = norm(old) [n, d_old]; Vᵀ U = P Σ Qᵀ (thin SVD); R = P Qᵀ maximises tr(Rᵀ Vᵀ U),
    i.e. minimises ‖V R − U‖_F over R with orthonormal columns (RᵀR = I when d_new ≥ d_old, R Rᵀ = I otherwise;
    square and orthogonal when both dimensions are equal). Fitted in float64, returned as float32.
    """
    new, old = np.asarray(new), np.asarray(old)
    _check_pair(new, old)
    m = normalize(new).T @ normalize(old)  # [d_new, d_old]
    p, _, qt = np.linalg.svd(m, full_matrices=False)  # p [d_new, k], qt [k, d_old], k = min(d_new, d_old)
    return (p @ qt).astype(np.float32)  # [d_new, d_old]


def orthogonality_error(r: np.ndarray) -> float:
    """max |G − I| with G = RᵀR (d_new ≥ d_old) or R Rᵀ: 0 for an exact Procrustes map."""
    r = np.asarray(r, dtype=np.float64)
    g = r.T @ r if r.shape[0] >= r.shape[1] else r @ r.T
    return float(np.max(np.abs(g - np.eye(len(g)))))


def fit_adapter(new: np.ndarray, old: np.ndarray, ridge: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Affine query adapter (W [d_new, d_old], b [d_old]) from the new space to the old one, by ridge regression.

    With X = norm(new), Y = norm(old) (rows) and X̄, Ȳ their column means, it minimises
        (1/n) Σᵢ ‖xᵢ W + b − yᵢ‖² + λ ‖W‖_F²,   λ = ridge · tr(C_xx) / d_new,
    whose solution is W = (C_xx + λ I)⁻¹ C_xy, b = Ȳ − X̄ W, with C_xx = (X − X̄)ᵀ(X − X̄)/n and
    C_xy = (X − X̄)ᵀ(Y − Ȳ)/n. The ridge is relative to the mean feature variance (0.01 adds 1% of it to every
    direction), so it means the same at any dimension and keeps the system solvable when n < d_new. The bias is
    not penalised. The adapter's query is norm(norm(φ*(x)) W + b) (see `MappedEmbedder`).
    """
    if not (ridge > 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a finite number > 0, got {ridge}")
    new, old = np.asarray(new), np.asarray(old)
    _check_pair(new, old)
    x, y = normalize(new), normalize(old)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)  # [d_new], [d_old]
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    cxx, cxy = xc.T @ xc / n, xc.T @ yc / n  # [d_new, d_new], [d_new, d_old]
    lam = ridge * max(float(np.trace(cxx)) / d, _EPS)
    w = np.linalg.solve(cxx + lam * np.eye(d), cxy)  # [d_new, d_old]
    b = y_mean - x_mean @ w  # [d_old]
    return w.astype(np.float32), b.astype(np.float32)


def slerp(u: np.ndarray, v: np.ndarray, a: float) -> np.ndarray:
    """Spherical interpolation of unit rows u, v [n, d] (Ricci et al., arXiv 2609.39836), float64 -> float32 rows.

    θ = arccos(clamp(⟨u, v⟩, −1 + ε, 1 − ε)), q = (sin((1 − a)θ) u + sin(aθ) v) / sin θ, then L2-normalised (a no-op
    up to rounding). Where ⟨u, v⟩ > 1 − ε (θ ≈ 0, e.g. u = v) the linear limit (1 − a) u + a v is used, so nothing
    divides by ~0. a = 0 gives u, a = 1 gives v. Antipodal rows (θ ≈ π) have no unique arc: the clamp keeps them
    finite. Same formula and ε as `slerp_torch`.
    """
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    cos_raw = np.sum(u * v, axis=1, keepdims=True)  # [n, 1]
    theta = np.arccos(np.clip(cos_raw, -1 + _COS_EPS, 1 - _COS_EPS))
    arc = (np.sin((1 - a) * theta) * u + np.sin(a * theta) * v) / np.sin(theta)  # [n, d]
    line = (1 - a) * u + a * v
    return normalize(np.where(cos_raw > 1 - _COS_EPS, line, arc)).astype(np.float32)


def slerp_torch(u: torch.Tensor, v: torch.Tensor, a: float) -> torch.Tensor:
    """`slerp` in torch, with ops ONNX opset 18 has (Clip, Acos, Sin, Where): unit rows u, v [n, d] -> q [n, d]."""
    cos_raw = (u * v).sum(dim=1, keepdim=True)  # [n, 1]
    theta = torch.acos(cos_raw.clamp(-1 + _COS_EPS, 1 - _COS_EPS))  # ≥ ~1.4e-3: sin θ never 0
    arc = (torch.sin((1 - a) * theta) * u + torch.sin(a * theta) * v) / torch.sin(theta)  # [n, d]
    line = (1 - a) * u + a * v
    return F.normalize(torch.where(cos_raw > 1 - _COS_EPS, line, arc), dim=1)


def map_features(new: np.ndarray, r: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """norm(norm(new) R (+ b)): Procrustes (b None) or the adapter's query [n, d_old], as `MappedEmbedder`."""
    y = normalize(new) @ np.asarray(r, dtype=np.float64)  # [n, d_old]
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64)
    return normalize(y).astype(np.float32)


def slerp_features(new: np.ndarray, old: np.ndarray, r: np.ndarray, a: float) -> np.ndarray:
    """slerp(norm(old), norm(norm(new) R), a) [n, d_old], as `SlerpEmbedder`."""
    return slerp(normalize(old), map_features(new, r), a)


def choose_slerp_weight(
    score: Callable[[float], float], grid: Sequence[float] = DEFAULT_GRID
) -> tuple[float, list[dict[str, float]]]:
    """The a in `grid` that maximises `score(a)` (ties: the smaller a), and every a's score for the report.

    `score` is the caller's, computed on a VALIDATION split, never the test set: e.g. min(cross gain, self gain)
    of top-1 on validation identities. Returns (a, [{"a": a, "score": s}, ...]) in increasing a.
    """
    values = sorted({float(a) for a in grid})
    if not values or values[0] < 0 or values[-1] > 1:
        raise ValueError(f"the SLERP grid must be non-empty and within [0, 1], got {list(grid)}")
    table: list[dict[str, float]] = []
    best_a, best = values[0], -math.inf
    for a in values:
        s = float(score(a))
        if math.isnan(s):
            raise ValueError(f"the validation score is NaN at a = {a}")
        table.append({"a": a, "score": s})
        if s > best:  # strict: an equal score later in the (increasing) grid does not replace the smaller a
            best_a, best = a, s
    return best_a, table


# ----------------------------------------------------------------------------------------------- torch modules


def _frozen_backbone(backbone: nn.Module) -> nn.Module:
    backbone = copy.deepcopy(backbone).eval()  # a copy: freezing must not touch the caller's model
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def _map_tensor(name: str, t: torch.Tensor | np.ndarray, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(t).detach().to("cpu", torch.float32).clone()
    if t.ndim != ndim or 0 in t.shape:
        raise ValueError(f"map tensor {name!r} must be {ndim}-d and non-empty, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"map tensor {name!r} holds NaN or infinite values")
    return t


class TrainingFreeEmbedder(nn.Module):
    """A composite: frozen backbone(s) plus a fitted map. Always in eval mode (`train()` is a no-op).

    `method` names it ("procrustes", "adapter", "slerp"), `parts()` its backbones by role, `map_tensors()` the
    fitted tensors, `weight` the SLERP a (None otherwise): what `components.embed.save_composite` stores.
    """

    method: str
    weight: float | None = None

    def parts(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def map_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def embed_features(self, new: np.ndarray, old: np.ndarray) -> np.ndarray:
        """What `forward` computes, on raw features already extracted: new [n, d_new], old [n, d_old]."""
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int:
        return int(self.map_tensors()["R"].shape[1])

    def train(self, mode: bool = True) -> TrainingFreeEmbedder:
        return super().train(False)  # BatchNorm statistics of a reused model must never move


class MappedEmbedder(TrainingFreeEmbedder):
    """norm(norm(φ(x)) R (+ b)): Procrustes (R orthogonal, b None) or the adapter (R = W, b)."""

    def __init__(
        self,
        backbone: nn.Module,
        R: torch.Tensor | np.ndarray,  # the paper's name
        b: torch.Tensor | np.ndarray | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__()
        self.method = method or ("procrustes" if b is None else "adapter")
        if self.method not in ("procrustes", "adapter"):
            raise ValueError(f"MappedEmbedder is 'procrustes' or 'adapter', not {self.method!r}")
        if (b is None) != (self.method == "procrustes"):
            raise ValueError("a Procrustes map has no bias b; an adapter has one")
        self.new = _frozen_backbone(backbone)
        self.register_buffer("R", _map_tensor("R", R, 2))  # [d_new, d_out]
        self.b: torch.Tensor | None
        if b is None:
            self.b = None
        else:
            self.register_buffer("b", _map_tensor("b", b, 1))  # [d_out]
            if self.b.shape[0] != self.R.shape[1]:
                raise ValueError(f"map tensor 'b' has {self.b.shape[0]} entries, R has {self.R.shape[1]} columns")
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, 1, H, W] in [-1, 1]
        y = F.normalize(self.new(x), dim=1) @ self.R  # [n, d_out]
        if self.b is not None:
            y = y + self.b
        return F.normalize(y, dim=1)

    def parts(self) -> dict[str, nn.Module]:
        return {"new": self.new}

    def map_tensors(self) -> dict[str, torch.Tensor]:
        return {"R": self.R} if self.b is None else {"R": self.R, "b": self.b}

    def embed_features(self, new: np.ndarray, old: np.ndarray | None = None) -> np.ndarray:
        b = None if self.b is None else self.b.numpy()
        return map_features(new, self.R.numpy(), b)


class SlerpEmbedder(TrainingFreeEmbedder):
    """slerp(norm φ_old(x), norm(norm(φ_new(x)) R), a): both backbones in one graph (two forward passes)."""

    method = "slerp"

    def __init__(
        self,
        old_backbone: nn.Module,
        new_backbone: nn.Module,
        R: torch.Tensor | np.ndarray,  # the paper's name
        a: float,
    ) -> None:
        super().__init__()
        a = float(a)
        if not 0 <= a <= 1:  # NaN fails too
            raise ValueError(f"the SLERP weight a must lie in [0, 1], got {a}")
        self.weight = a
        self.old = _frozen_backbone(old_backbone)
        self.new = _frozen_backbone(new_backbone)
        self.register_buffer("R", _map_tensor("R", R, 2))  # [d_new, d_old]
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, 1, H, W] in [-1, 1]
        u = F.normalize(self.old(x), dim=1)  # [n, d_old]
        v = F.normalize(F.normalize(self.new(x), dim=1) @ self.R, dim=1)  # [n, d_old]
        return slerp_torch(u, v, self.weight)

    def parts(self) -> dict[str, nn.Module]:
        return {"old": self.old, "new": self.new}

    def map_tensors(self) -> dict[str, torch.Tensor]:
        return {"R": self.R}

    def embed_features(self, new: np.ndarray, old: np.ndarray) -> np.ndarray:
        return slerp_features(new, old, self.R.numpy(), float(self.weight))  # type: ignore[arg-type]


# What each method's saved checkpoint holds: its backbone roles and its map tensors.
COMPOSITE_PARTS: dict[str, tuple[str, ...]] = {"procrustes": ("new",), "adapter": ("new",), "slerp": ("old", "new")}
COMPOSITE_MAPS: dict[str, tuple[str, ...]] = {"procrustes": ("R",), "adapter": ("R", "b"), "slerp": ("R",)}


def rebuild_composite(
    method: str, parts: Mapping[str, nn.Module], maps: Mapping[str, torch.Tensor], weight: float | None = None
) -> TrainingFreeEmbedder:
    """The composite `method` from its backbones and map tensors (what a checkpoint holds); ValueError if they
    do not fit the method (unknown method, missing or extra parts or tensors, wrong shapes, a outside [0, 1])."""
    if method not in COMPOSITE_PARTS:
        raise ValueError(f"unknown training-free method {method!r}; known: {', '.join(sorted(COMPOSITE_PARTS))}")
    if sorted(parts) != sorted(COMPOSITE_PARTS[method]):
        raise ValueError(f"{method} needs parts {list(COMPOSITE_PARTS[method])}, got {sorted(parts)}")
    if sorted(maps) != sorted(COMPOSITE_MAPS[method]):
        raise ValueError(f"{method} needs map tensors {list(COMPOSITE_MAPS[method])}, got {sorted(maps)}")
    if method == "slerp":
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"slerp needs a float weight a, got {type(weight).__name__}")
        return SlerpEmbedder(parts["old"], parts["new"], maps["R"], weight)
    if weight is not None:
        raise ValueError(f"{method} takes no weight a")
    return MappedEmbedder(parts["new"], maps["R"], maps.get("b"), method=method)


# ----------------------------------------------------------------------------------------------- names and args


class TrainingFreeArgs(MethodArgs):
    """What every map sits on: the paragon (method.md), or, for the shift study only, the MixBCT model trained with
    `base_args` (a map on top of MixBCT: does a query-side alignment add anything to compatibility training?)."""

    base: Literal["paragon", "mixbct"] = "paragon"
    base_args: dict[str, Any] = Field(default_factory=dict)  # MixBCT's arguments when base is mixbct

    @field_validator("base_args")
    @classmethod
    def _mixbct_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        from components.losses import method_args_model

        return method_args_model("mixbct").model_validate(value).model_dump(mode="json")


class ProcrustesArgs(TrainingFreeArgs):
    """Orthogonal Procrustes has no knob of its own."""


class SlerpArgs(TrainingFreeArgs):
    """SLERP's interpolation weight a: fixed, or (None) chosen on the validation split over `grid`."""

    weight: float | None = Field(None, ge=0, le=1)  # None: the grid's best on the caller's validation score
    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID), min_length=1)

    @field_validator("grid")
    @classmethod
    def _in_unit_interval(cls, grid: list[float]) -> list[float]:
        if any(not 0 <= a <= 1 for a in grid):
            raise ValueError(f"every grid value must lie in [0, 1], got {grid}")
        return grid


class AdapterArgs(TrainingFreeArgs):
    """The adapter's ridge, relative to the mean feature variance (see `fit_adapter`)."""

    ridge: float = Field(0.01, gt=0)


TRAINING_FREE: dict[str, type[MethodArgs]] = {"procrustes": ProcrustesArgs, "slerp": SlerpArgs, "adapter": AdapterArgs}


def training_free_args(name: str, args: Mapping[str, Any] | MethodArgs | None = None) -> MethodArgs:
    """`args` validated against method `name`'s model (a mapping, the model itself, or None for the defaults)."""
    if name not in TRAINING_FREE:
        raise ValueError(f"unknown training-free method {name!r}; known: {', '.join(sorted(TRAINING_FREE))}")
    model = TRAINING_FREE[name]
    if isinstance(args, MethodArgs):
        if not isinstance(args, model):
            raise TypeError(f"training-free method {name!r} takes {model.__name__}, got {type(args).__name__}")
        return args
    return model.model_validate(dict(args or {}))


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(normalize(a) * normalize(b), axis=1)))


def build_training_free(
    name: str,
    backbone_new: nn.Module,
    old_backbone: nn.Module | None,
    new_feats: np.ndarray,
    old_feats: np.ndarray,
    args: Mapping[str, Any] | MethodArgs | None = None,
    score: Callable[[FeatureMap], float] | None = None,
) -> tuple[TrainingFreeEmbedder, dict[str, Any]]:
    """Fit method `name` on the support set and return the exportable module and what was chosen.

    new_feats [n, d_new] / old_feats [n, d_old]: the paragon's and the old model's raw features of the same
    training images (rows paired). `old_backbone` (a torch backbone) is needed by "slerp" only.
    `score(feature_map) -> float` is the caller's validation score (higher is better), where
    `feature_map(new_val, old_val)` gives the composite's embeddings of validation images from their raw features
    (e.g. min(cross gain, self gain) of top-1 on validation identities). SLERP needs it when `weight` is None and
    picks a on `grid` with it; for the other methods it is only reported.

    info: method, support size, mean support cosine to norm(old) before (identity, when d_new = d_old) and after
    the map, orthogonality_error (Procrustes, SLERP), a and the validation table (SLERP), ridge (adapter),
    validation_score (when `score` is given). JSON-ready.
    """
    typed = training_free_args(name, args)
    new_feats, old_feats = np.asarray(new_feats), np.asarray(old_feats)
    _check_pair(new_feats, old_feats)
    info: dict[str, Any] = {"method": name, "support": len(new_feats)}
    if new_feats.shape[1] == old_feats.shape[1]:
        info["support_cosine_identity"] = _mean_cosine(new_feats, old_feats)
    module: TrainingFreeEmbedder
    if name == "adapter":
        assert isinstance(typed, AdapterArgs)
        w, b = fit_adapter(new_feats, old_feats, ridge=typed.ridge)
        module = MappedEmbedder(backbone_new, w, b, method="adapter")
        info["ridge"] = typed.ridge
    else:
        r = fit_procrustes(new_feats, old_feats)
        info["orthogonality_error"] = orthogonality_error(r)
        if name == "procrustes":
            module = MappedEmbedder(backbone_new, r)
        else:
            assert isinstance(typed, SlerpArgs)
            if old_backbone is None:
                raise ValueError("slerp needs the old model as a torch backbone (both models run per query)")
            table = None
            a = typed.weight
            if a is None:
                if score is None:
                    raise ValueError("SlerpArgs.weight is None: pass a validation `score` to choose it, or fix it")
                a, table = choose_slerp_weight(
                    lambda a_: score(lambda new, old: slerp_features(new, old, r, a_)), typed.grid
                )
            module = SlerpEmbedder(old_backbone, backbone_new, r, a)
            info["a"], info["validation_table"] = float(a), table
    support = module.embed_features(new_feats, old_feats)  # [n, d_old]
    info["support_cosine"] = _mean_cosine(support, old_feats)
    if info.get("validation_table"):
        info["validation_score"] = next(row["score"] for row in info["validation_table"] if row["a"] == info["a"])
    elif score is not None:
        info["validation_score"] = float(score(module.embed_features))
    return module, info
