"""Training-free baselines (Procrustes, SLERP, query adapter): the fits do what their formulas say, each composite
is one ONNX graph that agrees with torch, and its checkpoint round-trips through `load_backbone`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from components.embed import export_onnx, load_backbone, load_embedder, onnx_parity, save_composite
from components.errors import DataError
from components.models import build_backbone
from components.preprocess import to_input
from components.training_free import (
    TRAINING_FREE,
    MappedEmbedder,
    SlerpArgs,
    SlerpEmbedder,
    build_training_free,
    choose_slerp_weight,
    fit_adapter,
    fit_procrustes,
    map_features,
    normalize,
    orthogonality_error,
    slerp,
    slerp_features,
    slerp_torch,
)

D, SIZE = 16, 32
META = {"arch": "small_cnn", "embedding_dim": D, "image_size": SIZE}
METHODS = sorted(TRAINING_FREE)


def _backbone(seed: int) -> torch.nn.Module:
    """A small_cnn with seeded random weights and non-trivial BatchNorm statistics, as after training."""
    torch.manual_seed(seed)
    model = build_backbone("small_cnn", D, SIZE).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, SIZE, SIZE))
    return model.eval()


@pytest.fixture(scope="module")
def world() -> dict:
    images = np.random.default_rng(0).integers(0, 256, size=(64, SIZE, SIZE), dtype=np.uint8)
    old, new = _backbone(1), _backbone(2)
    x = to_input(torch.from_numpy(images))  # [64, 1, 32, 32] in [-1, 1]
    with torch.no_grad():
        old_feats, new_feats = old(x).numpy(), new(x).numpy()  # [64, 16] each
    return {"images": images, "x": x, "old": old, "new": new, "old_feats": old_feats, "new_feats": new_feats}


def _build(world: dict, name: str) -> tuple[torch.nn.Module, dict]:
    args = {"weight": 0.4} if name == "slerp" else None
    return build_training_free(name, world["new"], world["old"], world["new_feats"], world["old_feats"], args)


def _parts(name: str) -> dict:
    return {"old": META, "new": META} if name == "slerp" else {"new": META}


# ----------------------------------------------------------------------------------------------- fits


def test_procrustes_recovers_a_known_rotation() -> None:
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))  # a random orthogonal Q
    new = rng.standard_normal((200, D))
    r = fit_procrustes(new, new @ q)  # norm(new) Q = norm(new Q): rows keep their norms
    assert np.max(np.abs(r - q)) < 1e-5
    assert orthogonality_error(r) < 1e-5


def test_procrustes_is_orthogonal_on_unrelated_features(world: dict) -> None:
    r = fit_procrustes(world["new_feats"], world["old_feats"]).astype(np.float64)
    assert np.max(np.abs(r.T @ r - np.eye(D))) < 1e-5
    # it aligns at least as well as doing nothing (the identity is orthogonal too)
    u, v = normalize(world["old_feats"]), normalize(world["new_feats"])
    assert np.linalg.norm(v @ r - u) <= np.linalg.norm(v - u) + 1e-9


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return normalize(rng.standard_normal((n, D)))


def test_slerp_endpoints_norm_and_angle() -> None:
    rng = np.random.default_rng(4)
    u, v = _unit_rows(rng, 50), _unit_rows(rng, 50)
    assert np.max(np.abs(slerp(u, v, 0.0) - u)) < 1e-6
    assert np.max(np.abs(slerp(u, v, 1.0) - v)) < 1e-6
    theta = np.arccos(np.clip(np.sum(u * v, axis=1), -1, 1))
    for a in (0.1, 0.5, 0.7):
        q = slerp(u, v, a).astype(np.float64)
        assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-6)
        # on the great circle from u to v, a of the way along: ∠(u, q) = aθ, ∠(q, v) = (1 − a)θ
        assert np.allclose(np.arccos(np.clip(np.sum(u * q, axis=1), -1, 1)), a * theta, atol=1e-3)
        assert np.allclose(np.arccos(np.clip(np.sum(q * v, axis=1), -1, 1)), (1 - a) * theta, atol=1e-3)
        got = slerp_torch(torch.from_numpy(u).float(), torch.from_numpy(v).float(), a).numpy()
        assert np.max(np.abs(got - q)) < 1e-5


def test_slerp_is_finite_when_the_angle_vanishes() -> None:
    u = _unit_rows(np.random.default_rng(5), 8)
    for a in (0.0, 0.3, 1.0):
        for v in (u, -u):  # θ = 0 (u == v) and θ = π (antipodal): sin θ ≈ 0 in both
            q = slerp(u, v, a)
            qt = slerp_torch(torch.from_numpy(u).float(), torch.from_numpy(v).float(), a).numpy()
            assert np.isfinite(q).all() and np.isfinite(qt).all()
        assert np.max(np.abs(slerp(u, u, a) - u)) < 1e-6
        assert (
            np.max(np.abs(slerp_torch(torch.from_numpy(u).float(), torch.from_numpy(u).float(), a).numpy() - u)) < 1e-6
        )


def test_adapter_reduces_the_support_error() -> None:
    rng = np.random.default_rng(6)
    new = rng.standard_normal((300, D))
    old = new @ rng.standard_normal((D, D)) + 0.5 + 0.05 * rng.standard_normal((300, D))  # affine drift, not a rotation
    w, b = fit_adapter(new, old, ridge=1e-3)
    target = normalize(old)

    def err(y: np.ndarray) -> float:
        return float(np.mean(np.sum((normalize(y) - target) ** 2, axis=1)))

    identity, procrustes, adapter = (
        err(new),
        err(map_features(new, fit_procrustes(new, old))),
        err(map_features(new, w, b)),
    )
    assert adapter < 0.2 * identity and adapter < 0.5 * procrustes, (identity, procrustes, adapter)
    # deterministic: the same support set gives the same map, bit for bit
    w2, b2 = fit_adapter(new, old, ridge=1e-3)
    assert np.array_equal(w, w2) and np.array_equal(b, b2)


def test_choose_slerp_weight_picks_the_argmax_and_ties_to_the_smaller_a() -> None:
    a, table = choose_slerp_weight(lambda a: -((a - 0.3) ** 2))
    assert a == 0.3
    assert [row["a"] for row in table] == [round(i / 10, 1) for i in range(11)]
    assert table[3]["score"] == 0.0
    a, _ = choose_slerp_weight(lambda a: min(a, 0.5))  # 0.5, 0.6, ... 1.0 tie
    assert a == 0.5
    a, table = choose_slerp_weight(lambda a: 1.0, grid=[0.8, 0.2, 0.5])  # all tie: the smallest, table sorted
    assert a == 0.2 and [row["a"] for row in table] == [0.2, 0.5, 0.8]
    with pytest.raises(ValueError, match="NaN"):
        choose_slerp_weight(lambda a: float("nan"))


def test_build_slerp_chooses_a_on_the_callers_score(world: dict) -> None:
    new, old = world["new_feats"], world["old_feats"]
    r = fit_procrustes(new, old)
    target = slerp_features(new, old, r, 0.7)

    def score(feature_map) -> float:  # peaks where the map the caller is handed is slerp at a = 0.7
        return -float(np.max(np.abs(feature_map(new, old) - target)))

    module, info = build_training_free("slerp", world["new"], world["old"], new, old, None, score=score)
    assert isinstance(module, SlerpEmbedder) and module.weight == info["a"] == 0.7
    assert len(info["validation_table"]) == 11 and info["validation_score"] == 0.0
    assert info["orthogonality_error"] < 1e-5 and info["support"] == 64


def test_names_and_args_are_checked(world: dict) -> None:
    feats = (world["new_feats"], world["old_feats"])
    with pytest.raises(ValueError, match="known: adapter, procrustes, slerp"):
        build_training_free("rotation", world["new"], world["old"], *feats)
    with pytest.raises(ValueError, match="validation `score`"):
        build_training_free("slerp", world["new"], world["old"], *feats)
    with pytest.raises(ValueError, match="old model as a torch backbone"):
        build_training_free("slerp", world["new"], None, *feats, {"weight": 0.5})
    with pytest.raises(ValidationError):
        build_training_free("adapter", world["new"], None, *feats, {"lambda": 1.0})
    with pytest.raises(ValidationError):
        SlerpArgs(grid=[0.5, 1.5])


# ----------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("name", METHODS)
def test_module_is_the_fitted_formula(world: dict, name: str) -> None:
    module, info = _build(world, name)
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    module.train()
    assert not module.training, "a training-free composite stays in eval mode"
    assert all(p.requires_grad for p in world["new"].parameters()), "the caller's backbone is not frozen in place"
    with torch.no_grad():
        got = module(world["x"]).numpy()  # [64, 16]
    new, old = world["new_feats"], world["old_feats"]
    r = module.R.numpy()
    if name == "procrustes":
        assert isinstance(module, MappedEmbedder) and module.b is None
        assert np.array_equal(r, fit_procrustes(new, old))
        want = normalize(normalize(new) @ r)
    elif name == "adapter":
        w, b = fit_adapter(new, old, ridge=TRAINING_FREE["adapter"]().ridge)
        assert np.array_equal(r, w) and np.array_equal(module.b.numpy(), b)
        want = normalize(normalize(new) @ w + b)
    else:
        assert np.array_equal(r, fit_procrustes(new, old))
        want = slerp(normalize(old), normalize(normalize(new) @ r), 0.4)
    assert np.max(np.abs(got - want)) < 1e-5
    assert np.max(np.abs(got - module.embed_features(new, old))) < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert info["support_cosine"] > info["support_cosine_identity"], info


@pytest.mark.parametrize("name", METHODS)
def test_onnx_export_agrees_with_torch(world: dict, name: str, tmp_path: Path) -> None:
    module, _ = _build(world, name)
    export_onnx(module, tmp_path / "m.onnx", SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "one graph, weights inside the one file"
    parity = onnx_parity(module, tmp_path / "m.onnx", world["images"])
    print(f"{name}: ONNX parity {parity:.2e} on 64 images")
    assert parity < 1e-4
    emb = load_embedder(tmp_path / "m.onnx")
    assert (emb.dim, emb.image_size) == (D, SIZE)


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_round_trip(world: dict, name: str, tmp_path: Path) -> None:
    module, _ = _build(world, name)
    path = save_composite(module, tmp_path / "m.pt", _parts(name))
    loaded, meta = load_backbone(path)
    assert type(loaded) is type(module) and loaded.method == name
    assert (meta["arch"], meta["embedding_dim"], meta["image_size"]) == (name, D, SIZE)
    assert meta.get("a") == (0.4 if name == "slerp" else None)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(world["x"]), module(world["x"]))
    emb = load_embedder(path)  # the TorchEmbedder the evaluation uses
    assert emb.dim == D and np.array_equal(emb(world["x"].numpy()), module(world["x"]).detach().numpy())
    if name == "slerp":  # the old model's weights are in there, by design
        assert torch.equal(loaded.old.output.fc.weight, world["old"].output.fc.weight)


def test_truncated_composite_is_one_error_line(world: dict, tmp_path: Path) -> None:
    module, _ = _build(world, "slerp")
    path = save_composite(module, tmp_path / "m.pt", _parts("slerp"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        load_backbone(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_malformed_composites_are_refused_naming_the_file(world: dict, tmp_path: Path) -> None:
    module, _ = _build(world, "adapter")
    good = torch.load(save_composite(module, tmp_path / "good.pt", _parts("adapter")), weights_only=True)
    bad_cases = {
        "shape": {**good, "map": {"R": torch.zeros(D + 1, D), "b": torch.zeros(D)}},  # R must take d_new = 16
        "no_bias": {**good, "map": {"R": good["map"]["R"]}},
        "parts": {**good, "parts": {"old": good["parts"]["new"]}},
        "weights": {**good, "parts": {"new": {**good["parts"]["new"], "arch": "resnet_small"}}},
        "nan": {**good, "map": {"R": torch.full((D, D), float("nan")), "b": good["map"]["b"]}},
    }
    for case, payload in bad_cases.items():
        path = tmp_path / f"{case}.pt"
        torch.save(payload, path)
        with pytest.raises(DataError) as err:
            load_backbone(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: not a checkpoint written by this project") and "\n" not in msg, (case, msg)
    with pytest.raises(ValueError, match="needs parts"):
        save_composite(module, tmp_path / "x.pt", {"old": META})  # an adapter's one part is "new"
    assert not (tmp_path / "x.pt").exists()
