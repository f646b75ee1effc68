"""Each method owns its arguments: a typed model in its own file, validated when params.yaml is loaded.

A typo or a wrong type in `train.method_args` fails naming the field; the defaults are method.md's; and a new
method is one file (its args model and its class) plus one `register_method` line.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import Field, ValidationError

from components import losses
from components.config import load_config
from components.errors import ConfigError
from components.losses import (
    CompatibilityMethod,
    MethodArgs,
    available_methods,
    build_method,
    is_authors_variant,
    method_args_model,
    method_label,
    register_method,
    variant_of,
)
from components.losses.arcface import ArcFaceHead

ROOT = Path(__file__).resolve().parents[2]

# Every method's defaults, each from method.md ("MixBCT, exactly" / "Baselines") unless marked otherwise.
_UNIBCT = {"start_fraction": 0.3, "refresh_epochs": (), "lam": 0.9, "tau": 0.05}
_NCCL = {"queue_size": 8192, "feature_weight": 1.0, "logit_weight": 0.01}
_LCE = {"boundary_weight": 1.0, "align_weight": 100.0}
DEFAULTS = {
    "none": {},  # "Paragon: L_cls alone"
    "mixbct": {"alpha": 0.3, "l2_weight": 0.0, "skip_replaced": False},  # "choose floor(α·b) at random (α = 0.3; 38 of 128)"; no L2 term (shift study only)
    "l2": {"weight": 10.0},  # "L2: L_cls + 10 · mean ‖norm(old_i) − norm(new_i)‖₂"
    "weakened_l2": {"weight": 10.0, "margin": 0.2},  # "L_cls + 10 · mean max(0, ‖…‖₂ − 0.2)"
    # "L_cls + λ · L_inf … CE(s · ⟨norm(new_i), P_k⟩, y_i) with s = the L_cls scale (64) and λ = 1": s is not an
    # argument (the ArcFace s); the authors' variant drops it
    "bct": {"influence_weight": 1.0},
    "bct_authors": {"influence_weight": 1.0},
    # "the BCT head at the same scale, off for the first ~30% of epochs … λ = 0.9, τ = 0.05"
    "unibct": {"influence_weight": 1.0, **_UNIBCT},
    "unibct_authors": {"influence_weight": 1.0, **_UNIBCT},
    # "supervised contrastive loss … queue (8192) … temperature τ = 0.05 … + 0.01 · the same on … logit vectors";
    # the authors' variant: temperature 1, not an argument
    "nccl": {**_NCCL, "temperature": 0.05},
    "nccl_authors": _NCCL,
    # "L_p2s = 4 · …", "elastic boundary around 0.4"; adv_weight 4 and hidden 100: the authors' code (advbct.py)
    "advbct": {"p2s_weight": 4.0, "adv_weight": 4.0, "boundary_target": 0.4, "hidden": 100},
    # "boundary … + alignment 100 · MSE … with s = 64 scale both by s/16 = 4"; the unscaled variant: × 1
    "lce": {**_LCE, "weight_scale": 4.0},
    "lce_authors": _LCE,
}


def _refused(overrides: dict, *expected: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", overrides)
    for line in expected:
        assert line in str(err.value), str(err.value)
    return str(err.value)


# ------------------------------------------------------------------------------------------ (a) validated at load


def test_a_mistyped_or_unknown_argument_fails_naming_the_field() -> None:
    _refused({"train.method_args.alpha": "lots"}, "train.method_args.alpha: Input should be a valid number")
    _refused({"train.method_args.alfa": 0.1}, "train.method_args.alfa: unknown key (typo?)")
    _refused({"train.method_args.alpha": 1.5}, "train.method_args.alpha: Input should be less than or equal to 1")
    _refused({"train.method_args.alpha": float("nan")}, "train.method_args.alpha: Input should be a finite number")
    # validated against the *chosen* method: MixBCT's alpha means nothing to BCT or to the paragon
    _refused({"train.method": "bct", "train.method_args.alpha": 0.3}, "train.method_args.alpha: unknown key (typo?)")
    _refused({"train.method": "none", "train.method_args.alpha": 0.3}, "train.method_args.alpha: unknown key (typo?)")
    _refused({"train.method": "unibct", "train.method_args.refresh_epochs": [3, -1]},
             "train.method_args.refresh_epochs.1: Input should be greater than or equal to 0")  # fmt: skip
    # the old place of alpha says where it went, instead of a bare "unknown key"
    _refused({"train.alpha": 0.3}, "train.alpha moved to train.method_args.alpha")


def test_method_args_in_a_params_file(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # the shipped file: alpha chosen on validation, skip_replaced measured equal within the intervals
    assert raw["train"]["method_args"] == {"mixbct": {"alpha": 0.5, "skip_replaced": True}}
    raw["train"].update(method="nccl", method_args={"temperature": 0.1, "queue_size": 64})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    cfg = load_config(params)
    # resolved with nccl.py's defaults: `{}` and the same values spelled out are one model, one key
    assert cfg.train.method_args == {"queue_size": 64, "temperature": 0.1, "feature_weight": 1.0, "logit_weight": 0.01}
    method = build_method(cfg.train.method, embedding_dim=4, num_classes=3, args=cfg.train.method_args)
    assert method.temperature == 0.1 and method.queue_labels.numel() == 64 and method.logit_weight == 0.01

    raw["train"]["method_args"] = {"temprature": 0.1}
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params.yaml: invalid parameters:\n  train.method_args.temprature: unknown"):
        load_config(params)


def test_build_method_validates_too_and_no_factory_swallows_keywords() -> None:
    with pytest.raises(ValidationError, match="wieght"):
        build_method("l2", embedding_dim=4, num_classes=3, args={"wieght": 1.0})
    with pytest.raises(TypeError, match="takes MixBCTArgs"):
        build_method("mixbct", embedding_dim=4, num_classes=3, args=method_args_model("l2")())
    with pytest.raises(TypeError):
        build_method("l2", embedding_dim=4, num_classes=3, weight=1.0)  # type: ignore[call-arg]
    for name in available_methods():
        params = inspect.signature(losses._METHODS[name].factory).parameters.values()
        assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params), name


# ------------------------------------------------------------------------------------------ (b) defaults


def test_every_method_declares_its_arguments_with_method_md_defaults() -> None:
    assert set(available_methods()) == set(DEFAULTS)
    for name, expected in DEFAULTS.items():
        model = method_args_model(name)
        assert model().model_dump() == expected, name
        assert model.model_config["extra"] == "forbid" and model.model_config["frozen"], name
        assert model.model_config["allow_inf_nan"] is False, name


def test_defaults_reach_the_built_method() -> None:
    assert build_method("mixbct", embedding_dim=4, num_classes=3).alpha == 0.3
    bct = build_method("bct", embedding_dim=4, num_classes=3, s=64.0)
    assert (bct.scale, bct.influence_weight) == (64.0, 1.0)  # the L_cls scale, λ = 1
    assert build_method("bct", embedding_dim=4, num_classes=3, s=32.0).scale == 32.0
    assert build_method("bct_authors", embedding_dim=4, num_classes=3, s=64.0).scale == 1.0  # s dropped
    with pytest.raises(ValidationError, match="scale"):  # the variant is a method of its own, not an argument
        build_method("bct", embedding_dim=4, num_classes=3, args={"scale": 1.0})
    uni = build_method("unibct", embedding_dim=4, num_classes=3)
    assert (uni.scale, uni.start_fraction, uni.lam, uni.tau, uni.refresh_epochs) == (64.0, 0.3, 0.9, 0.05, set())
    assert build_method("unibct_authors", embedding_dim=4, num_classes=3).scale == 1.0
    assert build_method("nccl", embedding_dim=4, num_classes=3).temperature == 0.05
    assert build_method("nccl_authors", embedding_dim=4, num_classes=3).temperature == 1.0
    with pytest.raises(ValidationError, match="temperature"):
        build_method("nccl_authors", embedding_dim=4, num_classes=3, args={"temperature": 0.05})
    lce = build_method("lce", embedding_dim=4, num_classes=3)
    assert (lce.weight_scale, lce.boundary_weight, lce.align_weight) == (4.0, 4.0, 400.0)  # official weights × 4
    lce16 = build_method("lce", embedding_dim=4, num_classes=3, args={"weight_scale": 16.0})
    assert (lce16.boundary_weight, lce16.align_weight) == (16.0, 1600.0)
    authors = build_method("lce_authors", embedding_dim=4, num_classes=3)
    assert (authors.weight_scale, authors.boundary_weight, authors.align_weight) == (1.0, 1.0, 100.0)
    weak = build_method("weakened_l2", embedding_dim=4, num_classes=3)
    assert (weak.weight, weak.margin) == (10.0, 0.2)
    assert build_method("l2", embedding_dim=4, num_classes=3).margin == 0.0


def test_authors_variants_are_separate_labelled_methods() -> None:
    """Each variant of method.md's "Baselines" is its own registered name, labelled for reports; the methods
    themselves carry their plain names."""
    variants = {name for name in available_methods() if is_authors_variant(name)}
    assert variants == {"bct_authors", "unibct_authors", "nccl_authors", "lce_authors"}
    for name in variants:
        corrected = variant_of(name)
        assert corrected == name.removesuffix("_authors") and not is_authors_variant(corrected)
        paper_name = {"bct": "BCT", "unibct": "UniBCT", "nccl": "NCCL", "lce": "LCE"}[corrected]
        assert method_label(name).startswith(f"{paper_name} (")
        assert method_args_model(name)().model_dump() == DEFAULTS[name]
    label = "BCT (MixBCT authors' variant: unscaled cosine logits, synthesised classifier)"
    assert method_label("bct_authors") == label
    assert method_label("nccl_authors") == "NCCL (MixBCT authors' variant: temperature 1)"
    for name in set(available_methods()) - variants:
        assert method_label(name) == name and variant_of(name) is None
    with pytest.raises(ValueError, match="unknown method 'bct_author'"):
        method_label("bct_author")
    _refused({"train.method": "bct", "train.method_args.scale": 1.0}, "train.method_args.scale: unknown key (typo?)")
    cfg = load_config(ROOT / "params.yaml", {"train.method": "bct_authors"})
    assert cfg.train.method == "bct_authors" and cfg.train.method_args == {"influence_weight": 1.0}


def test_mixbct_from_params_yaml_is_alpha_0_5() -> None:
    """params.yaml's `method_args: {mixbct: {alpha: 0.5}}` (chosen on validation) builds MixBCTArgs(alpha=0.5)'s
    MixBCT: same alpha, same draws; method.md's 0.3 stays the method's own default."""
    from components.losses.mixbct import MixBCT, MixBCTArgs, choose_rows

    cfg = load_config(ROOT / "params.yaml")
    built = build_method("mixbct", embedding_dim=4, num_classes=3, seed=cfg.train.seed, args=cfg.train.method_args)
    direct = MixBCT(4, 3, seed=cfg.train.seed, args=MixBCTArgs(alpha=0.5))
    assert MixBCTArgs().alpha == 0.3
    credible = torch.ones(128, dtype=torch.bool)
    for _ in range(3):
        rows = choose_rows(credible, built.alpha, built.generator)
        assert len(rows) == 64 and torch.equal(rows, choose_rows(credible, direct.alpha, direct.generator))


# ------------------------------------------------------------------------------------------ (c) a new method


class ToyArgs(MethodArgs):
    weight: float = Field(1.0, ge=0)


class Toy(CompatibilityMethod):
    """ArcFace plus weight · mean ‖new‖²: a compatibility method in a few lines (the class is its own factory)."""

    def __init__(self, *, embedding_dim: int, num_classes: int, s: float, m: float, seed: int, args: ToyArgs) -> None:
        super().__init__()
        self.head = ArcFaceHead(embedding_dim, num_classes, s=s, m=m)
        self.weight = args.weight

    def forward(self, new, labels, old=None, credible=None) -> dict[str, torch.Tensor]:  # type: ignore[override]
        cls = self.head(new, labels)
        norm = new.pow(2).sum(dim=1).mean()
        return {"loss": cls + self.weight * norm, "cls": cls.detach(), "norm": norm.detach()}


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch):
    """Registers "toy" in a copy of the registry, so it never leaks into another test."""
    shipped = available_methods()  # every shipped method is registered before the registry is swapped
    monkeypatch.setattr(losses, "_METHODS", dict(losses._METHODS))
    register_method("toy", args=ToyArgs)(Toy)  # the one registry line a new method needs
    yield "toy"
    monkeypatch.undo()
    assert available_methods() == shipped


def test_a_new_method_is_one_file_plus_one_line_and_trains(toy: str, tmp_path: Path) -> None:
    from components.models import build_backbone
    from components.task import CompatibleTask
    from components.train import LoopConfig, TrainArrays, fit

    _refused({"train.method": toy, "train.method_args.wieght": 2.0}, "train.method_args.wieght: unknown key (typo?)")
    cfg = load_config(ROOT / "params.yaml", {"train.method": toy, "train.method_args.weight": 0.5})
    assert cfg.train.method == "toy" and cfg.train.method_args == {"weight": 0.5}

    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", 8, 16)
    method = build_method(cfg.train.method, embedding_dim=8, num_classes=4, s=cfg.train.arcface_s,
                          m=cfg.train.arcface_m, seed=cfg.train.seed, args=cfg.train.method_args)  # fmt: skip
    assert isinstance(method, Toy) and method.weight == 0.5
    before = method.head.weight.detach().clone()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 4)
    data = TrainArrays(rng.integers(0, 255, size=(16, 16, 16), dtype=np.uint8), labels)
    history = fit(CompatibleTask(backbone, method), backbone, data, LoopConfig(epochs=1, batch_size=16, lr=0.05),
                  tmp_path / "ck.pt")  # fmt: skip  (16 images, batch 16: one step)
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and "norm" in history[0]
    assert not torch.equal(method.head.weight.detach(), before)  # the step reached the method's own classifier


def test_per_method_args_apply_to_the_selected_method_and_flat_keys_override() -> None:
    params = {"train.method_args": {"mixbct": {"alpha": 0.5}, "lce": {"weight_scale": 16.0}}}
    assert load_config(None, params).train.method_args == {"alpha": 0.5, "l2_weight": 0.0, "skip_replaced": False}
    assert load_config(None, {**params, "train.method": "lce"}).train.method_args["weight_scale"] == 16.0
    assert load_config(None, {**params, "train.method": "l2"}).train.method_args == {"weight": 10.0}  # no alpha
    flat = load_config(None, {**params, "train.method_args.alpha": 0.7})
    assert flat.train.method_args == {"alpha": 0.7, "l2_weight": 0.0, "skip_replaced": False}
    with pytest.raises(ConfigError, match="mixbct.alfa"):  # every method's entry is checked, selected or not
        load_config(None, {"train.method": "l2", "train.method_args": {"mixbct": {"alfa": 0.5}}})
    with pytest.raises(ConfigError, match="train.method_args.alpha: unknown key"):
        load_config(None, {**params, "train.method": "l2", "train.method_args.alpha": 0.7})
