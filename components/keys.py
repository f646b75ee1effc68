"""What each piece of an upgrade depends on: the one place that says it.

Every key is a content hash of exactly the params (and input content hashes) a piece depends on. The same
functions name the training checkpoints (resume), the benchmark's shared folders (computed once per key), the
params DVC lists for each stage (dvc.yaml is generated from components.pipeline, which asks here) and the upgrade
key a scheduled run compares with the registry ("nothing to upgrade").

- The paragon (method "none", ArcFace alone) depends on the data and the training recipe, never on the
  compatibility method or its arguments: changing `train.method` reuses it on every path.
- `runtime` (threads, workers) changes how fast, not what: it is in no key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from components.config import Config, LegacyConfig, TrainConfig

# TrainConfig fields that only the compatible model depends on (the paragon is trained without them) ...
METHOD_FIELDS = frozenset({"method", "method_args"})
# ... and those that change no model: whether a paragon is trained at all.
NOT_A_RECIPE = frozenset({"paragon"})


def digest(*parts: Any) -> str:
    """A short, stable content hash of JSON-able parts (pydantic models are dumped)."""
    dumped = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    return hashlib.sha256(json.dumps(dumped, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_fields(role: str) -> list[str]:
    """The `train.*` fields a model of `role` ("new" or "paragon") depends on, in declaration order."""
    skip = NOT_A_RECIPE | (METHOD_FIELDS if role == "paragon" else frozenset())
    return [f for f in TrainConfig.model_fields if f not in skip]


def train_recipe(cfg: TrainConfig, role: str) -> dict[str, Any]:
    values = cfg.model_dump(mode="json")
    return {f: values[f] for f in train_fields(role)}


def legacy_checkpoint(legacy: LegacyConfig, image_size: int, manifest_sha256: str) -> str:
    """Checkpoint name of the old model trained here: its recipe, the input size and the dataset."""
    return f"legacy-{digest(legacy, image_size, manifest_sha256)}"


def model_checkpoint(
    train: TrainConfig, role: str, image_size: int, manifest_sha256: str, old_features_sha256: str | None
) -> str:
    """Checkpoint name of the new model or the paragon; old features count only for a method that reads them."""
    parts: list[Any] = [train_recipe(train, role), role, image_size, manifest_sha256]
    if old_features_sha256 is not None:
        parts.append(old_features_sha256)
    return f"{role}-{digest(*parts)}"


def shared(cfg: Config) -> dict[str, str]:
    """The benchmark's shared folders: which piece of a cell's work lives where (equal keys = computed once)."""
    d = cfg.as_dict()
    data = digest("data", d["data"])
    legacy = digest("legacy", data, d["legacy"], d["old"])
    extract = {k: v for k, v in d["extract"].items() if k != "shard_rows"}  # how it is split changes no value
    features = digest("features", legacy, extract, cfg.train.embedding_dim)
    paragon = digest("paragon", data, train_recipe(cfg.train, "paragon"))
    new = digest("new", features, train_recipe(cfg.train, "new"))
    return {"data": data, "legacy": legacy, "features": features, "paragon": paragon, "new": new}


def params_digest(cfg: Config) -> str:
    """Full hash of every param that shapes a result (all sections but `runtime`)."""
    what = {k: v for k, v in cfg.as_dict().items() if k != "runtime"}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def upgrade_key(cfg: Config, data: str, old_model: str | None = None, gallery: str | None = None) -> str:
    """Content hash of everything an upgrade depends on: params (not runtime), the raw data's hash `data`, and
    the content hashes of a user's old model and gallery."""
    parts: dict[str, Any] = {"params": params_digest(cfg), "data": data}
    if old_model is not None and gallery is not None:
        parts["old_model"], parts["gallery"] = old_model, gallery
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
