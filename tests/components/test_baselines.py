"""Baseline compatibility methods (method.md, "Baselines") against loop-by-loop numpy references.

Every reference below is written from the formula, independently of the implementation: plain Python loops
over rows, classes and queue entries, numpy for arithmetic, np.linalg.inv for UniBCT's graph transition.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arcface_reference import reference_arcface

from components.losses import available_methods, build_method
from components.losses.advbct import GradReverse
from components.losses.prototypes import class_centres

B, D, C = 6, 4, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine a parallel region waiting
    for a descheduled thread costs milliseconds per op; restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BASELINES = ["l2", "weakened_l2", "bct", "unibct", "nccl", "advbct", "lce"]


# ------------------------------------------------------------------------------------------ references


def unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(float(x) * float(x) for x in v))


def cross_entropy(logits: list[float], target: int) -> float:
    top = max(logits)
    return -logits[target] + top + math.log(sum(math.exp(z - top) for z in logits))


def ref_centres(old: np.ndarray, labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    centres = []
    for c in range(n_classes):
        rows = [unit(old[j]) for j in range(len(old)) if labels[j] == c]
        centres.append(unit(np.sum(rows, axis=0) / len(rows)))
    return centres


def ref_iqr_max(values: list[float]) -> float:
    r = sorted(values)
    n = len(r)
    if n >= 4:
        q1, q3 = r[n // 4], r[(3 * n) // 4]
        iqr = q3 - q1
        r = [v for v in r if q1 - 1.5 * iqr <= v <= q3 + 1.5 * iqr]
    return max(r)


def close(a: float, b: float, tol: float = 1e-4) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


# ------------------------------------------------------------------------------------------ data


def train_set(sizes: tuple[int, ...] = (8, 8, 8), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Old features [N, D] of a tiny training set: one direction per class, noise, and one far outlier in
    class 0 (so the 1.5·IQR removal has something to remove)."""
    g = np.random.default_rng(seed)
    directions = g.normal(size=(len(sizes), D))
    old, labels = [], []
    for c, n in enumerate(sizes):
        for j in range(n):
            old.append(3.0 * directions[c] + g.normal(scale=0.6, size=D))
            labels.append(c)
    old[0] = -5.0 * directions[0]  # the outlier
    perm = g.permutation(len(labels))
    return np.asarray(old, dtype=np.float32)[perm], np.asarray(labels)[perm]


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    new = torch.tensor(g.normal(size=(B, D)), dtype=torch.float32)
    old = torch.tensor(g.normal(size=(B, D)) * 3.0, dtype=torch.float32)  # unnormalised on purpose
    return new, old, torch.tensor([0, 1, 2, 0, 1, 2])


def head_weight(method: torch.nn.Module) -> np.ndarray:
    return method.head.weight.detach().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------ registry


def test_registry_knows_every_baseline_and_builds_them_with_the_stage_kwargs() -> None:
    assert set(BASELINES) <= set(available_methods())
    for name in BASELINES:
        method = build_method(name, embedding_dim=D, num_classes=C, s=64.0, m=0.5, seed=0, args={})
        assert method.needs_old_features, name


@pytest.mark.parametrize("name", ["bct", "unibct", "advbct", "lce"])
def test_prototype_methods_refuse_missing_old_features(name: str) -> None:
    with pytest.raises(ValueError, match="old features"):
        build_method(name, embedding_dim=D, num_classes=C).prepare(None, torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ L2, weakened L2


@pytest.mark.parametrize(("name", "margin"), [("l2", 0.0), ("weakened_l2", 0.2)])
def test_l2_and_weakened_l2_match_hand_reference(name: str, margin: float) -> None:
    new, old, labels = batch()
    new[0] = 2.0 * old[0] / old[0].norm() + 0.01  # inside the 0.2 dead zone: weakened L2 ignores this row
    method = build_method(name, embedding_dim=D, num_classes=C)
    out = method(new, labels, old)
    n, o = new.numpy().astype(np.float64), old.numpy().astype(np.float64)
    terms = []
    for i in range(B):
        dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(unit(o[i]), unit(n[i]), strict=True)))
        terms.append(max(0.0, dist - margin))
    assert terms[0] < 0.2
    expected = reference_arcface(n, head_weight(method), labels.numpy(), 64.0, 0.5) + 10.0 * float(np.mean(terms))
    assert close(out["loss"].item(), expected)
    assert close(out[name].item(), float(np.mean(terms)))


# ------------------------------------------------------------------------------------------ BCT


@pytest.mark.parametrize(("args", "scale"), [({}, 64.0), ({"scale": 1.0}, 1.0), ({"scale": 16.0}, 16.0)])
def test_bct_influence_loss_matches_hand_reference(args: dict, scale: float) -> None:
    """Default: the logits at the ArcFace scale s = 64 (method.md); scale 1 is the MixBCT authors' variant."""
    old_all, labels_all = train_set()
    new, old, labels = batch()
    method = build_method("bct", embedding_dim=D, num_classes=C, args=args)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    protos = ref_centres(old_all.astype(np.float64), labels_all, C)
    n = new.numpy().astype(np.float64)
    influence = np.mean(
        [
            cross_entropy([scale * float(np.dot(unit(n[i]), protos[c])) for c in range(C)], int(labels[i]))
            for i in range(B)
        ]
    )
    out = method(new, labels, old)
    expected = reference_arcface(n, head_weight(method), labels.numpy(), 64.0, 0.5) + influence
    assert close(out["loss"].item(), expected)
    assert close(out["influence"].item(), float(influence))
    assert np.allclose(method.prototypes.numpy(), np.stack(protos), atol=1e-6)
    assert torch.allclose(method.prototypes.norm(dim=1), torch.ones(C))


# ------------------------------------------------------------------------------------------ UniBCT


def ref_refine(new_all: np.ndarray, old_all: np.ndarray, labels_all: np.ndarray, n_classes: int) -> np.ndarray:
    lam, tau = 0.9, 0.05
    protos = []
    for c in range(n_classes):
        rows = [j for j in range(len(labels_all)) if labels_all[j] == c]
        f = np.stack([unit(new_all[j]) for j in rows])
        o = np.stack([unit(old_all[j]) for j in rows])
        n = len(rows)
        if n == 1:
            refined = o
        else:
            a = np.zeros((n, n))
            for j in range(n):  # column-softmax over i ≠ j
                col = [math.exp(float(np.dot(f[i], f[j])) / tau) if i != j else 0.0 for i in range(n)]
                for i in range(n):
                    a[i, j] = col[i] / sum(col)
            refined = (1 - lam) * np.linalg.inv(np.eye(n) - lam * a) @ o
        protos.append(unit(refined.mean(axis=0)))
    return np.stack(protos)


def test_unibct_head_is_off_before_switch_on_and_refined_on_after() -> None:
    sizes = (7, 7, 9, 1)  # two classes of equal size (batched solve) and a one-sample class
    n_classes = len(sizes)
    old_all, labels_all = train_set(sizes, seed=3)
    new_all = torch.tensor(np.random.default_rng(4).normal(size=(len(labels_all), D)), dtype=torch.float32)
    calls: list[int] = []

    def embed_train() -> torch.Tensor:
        calls.append(1)
        return new_all

    method = build_method("unibct", embedding_dim=D, num_classes=n_classes, args={"refresh_epochs": [6]})
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    new, old, _ = batch()
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    n = new.numpy().astype(np.float64)
    arcface = reference_arcface(n, head_weight(method), labels.numpy(), 64.0, 0.5)
    assert method.switch_on_epoch(10) == 3  # first 30% of 10 epochs off
    for epoch in range(3):
        method.on_epoch_start(epoch, 10, embed_train)
        out = method(new, labels, old)
        assert torch.equal(out["loss"], method.head(new, labels)) and close(out["loss"].item(), arcface)
        assert out["influence"].item() == 0.0
    assert calls == []  # no refinement while off

    method.on_epoch_start(3, 10, embed_train)
    assert len(calls) == 1 and int(method.refined_epoch) == 3
    expected_protos = ref_refine(new_all.numpy().astype(np.float64), old_all.astype(np.float64), labels_all, n_classes)
    assert np.allclose(method.prototypes.numpy(), expected_protos, atol=1e-5)
    assert torch.allclose(method.prototypes.norm(dim=1), torch.ones(n_classes), atol=1e-6)
    influence = np.mean(  # at the ArcFace scale s = 64, UniBCT's default (method.md)
        [
            cross_entropy([64.0 * float(np.dot(unit(n[i]), p)) for p in expected_protos], int(labels[i]))
            for i in range(B)
        ]
    )
    out = method(new, labels, old)
    assert close(out["loss"].item(), arcface + influence)
    assert close(out["influence"].item(), float(influence))

    for epoch in (4, 5):
        method.on_epoch_start(epoch, 10, embed_train)
    assert len(calls) == 1  # no refresh listed for 4, 5
    method.on_epoch_start(6, 10, embed_train)
    assert len(calls) == 2 and int(method.refined_epoch) == 6


def test_unibct_refinement_keeps_the_class_mean() -> None:
    """A property of the formula, documented in unibct.py: A is column-stochastic, so the class mean of
    (1 − λ)(I − λA)⁻¹O equals the mean of O, and the refined prototypes equal BCT's plain class means."""
    old_all, labels_all = train_set((7, 7, 9, 1), seed=5)
    new_all = np.random.default_rng(6).normal(size=(len(labels_all), D))
    refined = ref_refine(new_all, old_all.astype(np.float64), labels_all, 4)
    plain = class_centres(torch.from_numpy(old_all), torch.from_numpy(labels_all), 4).numpy()
    assert np.allclose(refined, plain, atol=1e-6)


# ------------------------------------------------------------------------------------------ NCCL


def ref_supcon(
    sims: list[list[float]], labels: list[int], queue_labels: list[int], weights: list[list[float]]
) -> float:
    per_row = []
    for i, row in enumerate(sims):
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        pos = [k for k in range(len(row)) if queue_labels[k] == labels[i]]
        if pos:
            per_row.append(sum(weights[i][k] * (row[k] - lse) for k in pos) / len(pos))
    return -float(np.mean(per_row))


def ref_nccl_step(
    queue: list[tuple[np.ndarray, int]], new, old, labels, w, size: int, temperature: float
) -> tuple[float, float]:
    """Enqueue the batch (FIFO, last `size` kept), then both contrastive terms at `temperature`."""
    for o, y in zip(old, labels, strict=True):
        queue.append((unit(o), int(y)))
    del queue[: max(0, len(queue) - size)]
    qf, ql = [q for q, _ in queue], [y for _, y in queue]
    wn = [unit(w[c]) for c in range(len(w))]
    sims, cos, weights = [], [], []
    for i in range(len(new)):
        ni, oi = unit(new[i]), unit(old[i])
        zi = np.array([float(np.dot(ni, wc)) for wc in wn])
        sims.append([float(np.dot(ni, q)) / temperature for q in qf])
        weights.append([0.5 * (1.0 + float(np.dot(oi, q))) for q in qf])
        row = []
        for q in qf:
            zq = np.array([float(np.dot(q, wc)) for wc in wn])
            row.append(float(np.dot(zi, zq)) / (np.linalg.norm(zi) * np.linalg.norm(zq)) / temperature)
        cos.append(row)
    ys = [int(y) for y in labels]
    return ref_supcon(sims, ys, ql, weights), ref_supcon(cos, ys, ql, weights)


def test_nccl_matches_hand_reference_over_two_steps_with_wraparound() -> None:
    method = build_method("nccl", embedding_dim=D, num_classes=C, args={"queue_size": 8})  # τ = 0.05 by default
    queue: list[tuple[np.ndarray, int]] = []
    for step in range(2):
        new, old, labels = batch(seed=10 + step)
        out = method(new, labels, old)
        feat, logit = ref_nccl_step(
            queue, new.numpy().astype(np.float64), old.numpy().astype(np.float64), labels.numpy(),
            head_weight(method), size=8, temperature=0.05,
        )  # fmt: skip
        arcface = reference_arcface(new.numpy().astype(np.float64), head_weight(method), labels.numpy(), 64.0, 0.5)
        assert close(out["contrast"].item(), feat) and close(out["contrast_logits"].item(), logit)
        assert close(out["loss"].item(), arcface + 1.0 * feat + 0.01 * logit)
    assert int(method.queue_filled) == 8 and int(method.queue_ptr) == (2 * B) % 8
    got, want = method.queue_features.numpy(), np.stack([q for q, _ in queue])  # the last 8 old rows, any order
    assert np.allclose(got[np.argsort(got[:, 0])], want[np.argsort(want[:, 0])], atol=1e-6)
    assert sorted(method.queue_labels.tolist()) == sorted(y for _, y in queue)


# ------------------------------------------------------------------------------------------ AdvBCT


def ref_discriminator(x: np.ndarray, disc: torch.nn.Sequential) -> np.ndarray:
    """Linear → BatchNorm (training: batch mean, biased variance, eps 1e-5) → ReLU → Linear, loop by loop."""
    lin1, bn, _, lin2 = disc
    w1, b1 = lin1.weight.detach().double().numpy(), lin1.bias.detach().double().numpy()
    g, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    w2, b2 = lin2.weight.detach().double().numpy(), lin2.bias.detach().double().numpy()
    h = np.array([[float(np.dot(w1[k], x[i])) + b1[k] for k in range(len(w1))] for i in range(len(x))])
    for k in range(h.shape[1]):
        mu = sum(h[:, k]) / len(h)
        var = sum((v - mu) ** 2 for v in h[:, k]) / len(h)
        h[:, k] = [max(0.0, (v - mu) / math.sqrt(var + 1e-5) * g[k] + beta[k]) for v in h[:, k]]
    return np.array([[float(np.dot(w2[k], h[i])) + b2[k] for k in range(len(w2))] for i in range(len(h))])


def test_advbct_matches_hand_reference() -> None:
    old_all, labels_all = train_set()
    method = build_method("advbct", embedding_dim=D, num_classes=C)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    with torch.no_grad():
        method.boundary.copy_(torch.tensor([0.5, -1.0, 2.0]))
    method.on_epoch_start(2, 5, lambda: torch.empty(0))
    new, old, labels = batch()
    out = method(new, labels, old)

    o_all = old_all.astype(np.float64)
    centres = ref_centres(o_all, labels_all, C)
    radii, raw_max = [], []
    for c in range(C):
        dists = [float(np.linalg.norm(unit(o_all[j]) - centres[c])) for j in range(len(o_all)) if labels_all[j] == c]
        radii.append(ref_iqr_max(dists))
        raw_max.append(max(dists))
    assert radii[0] < raw_max[0]  # the outlier was removed
    assert np.allclose(method.radii.numpy(), radii, atol=1e-6)
    assert np.allclose(method.centres.numpy(), np.stack(centres), atol=1e-6)

    n, o = new.numpy().astype(np.float64), old.numpy().astype(np.float64)
    beta = [0.5, -1.0, 2.0]
    p2s = []
    for i in range(B):
        y = int(labels[i])
        elastic = radii[y] + 1.0 / (1.0 + math.exp(-beta[y])) * (0.4 - radii[y])
        p2s.append(max(float(np.linalg.norm(unit(n[i]) - centres[y])) - elastic, 0.0))
    d_new = ref_discriminator(np.stack([unit(v) for v in n]), method.discriminator)
    d_old = ref_discriminator(np.stack([unit(v) for v in o]), method.discriminator)
    adv = np.mean([cross_entropy(list(r), 0) for r in d_new]) + np.mean([cross_entropy(list(r), 1) for r in d_old])
    decay = (5 - 2 + 1) / 5
    expected = reference_arcface(n, head_weight(method), labels.numpy(), 64.0, 0.5) + 4 * np.mean(p2s) + 4 * decay * adv
    assert close(out["p2s"].item(), float(np.mean(p2s))) and close(out["adv"].item(), float(adv))
    assert close(out["loss"].item(), float(expected))


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = GradReverse.apply(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)


# ------------------------------------------------------------------------------------------ LCE


def test_lce_matches_hand_reference() -> None:
    old_all, labels_all = train_set()
    method = build_method("lce", embedding_dim=D, num_classes=C)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    new, old, labels = batch()
    out = method(new, labels, old)

    o_all = old_all.astype(np.float64)
    centres = ref_centres(o_all, labels_all, C)
    theta = []
    for c in range(C):
        rows = [j for j in range(len(o_all)) if labels_all[j] == c]
        angles = [math.acos(min(1.0, float(np.dot(unit(o_all[j]), centres[c])))) for j in rows]
        theta.append(ref_iqr_max(angles))
    assert np.allclose(method.theta.numpy(), theta, atol=1e-5)
    n, w = new.numpy().astype(np.float64), head_weight(method)
    boundary, align = [], []
    for i in range(B):
        y = int(labels[i])
        boundary.append(max(math.acos(float(np.dot(centres[y], unit(n[i])))) - theta[y], 0.0))
        align.append(1.0 - float(np.dot(centres[y], unit(w[y]))))
    assert close(out["boundary"].item(), float(np.mean(boundary))) and close(out["align"].item(), float(np.mean(align)))
    expected = reference_arcface(n, w, labels.numpy(), 64.0, 0.5) + np.mean(boundary) + np.mean(align)
    assert close(out["loss"].item(), float(expected))


# ------------------------------------------------------------------------------------------ all methods


def ready(name: str) -> torch.nn.Module:
    """A method after prepare() and, for UniBCT, at its switch-on epoch (head on)."""
    old_all, labels_all = train_set()
    method = build_method(name, embedding_dim=D, num_classes=C)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    new_all = torch.tensor(np.random.default_rng(7).normal(size=(len(labels_all), D)), dtype=torch.float32)
    method.on_epoch_start(3, 10, lambda: new_all)
    return method


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_reach_backbone_and_every_trainable_parameter(name: str) -> None:
    torch.manual_seed(0)
    backbone = torch.nn.Linear(5, D)
    method = ready(name)
    _, old, labels = batch()
    out = method(backbone(torch.randn(B, 5)), labels, old)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for key, value in out.items():
        assert value.ndim == 0 and (key == "loss" or not value.requires_grad), key
    for param in [*backbone.parameters(), *method.parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


STATE = {
    "bct": ["prototypes"],
    "unibct": ["prototypes", "refined_epoch"],
    "nccl": ["queue_features", "queue_labels", "queue_ptr", "queue_filled"],
    "advbct": ["centres", "radii", "boundary", "discriminator.0.weight", "discriminator.1.running_mean"],
    "lce": ["centres", "theta"],
}


@pytest.mark.parametrize("name", sorted(STATE))
def test_state_that_must_survive_resume_is_in_state_dict(name: str) -> None:
    method = ready(name)
    _, old, labels = batch()
    method(torch.randn(B, D), labels, old)  # NCCL: fills the queue; AdvBCT: updates the BatchNorm statistics
    state = method.state_dict()
    assert set(STATE[name]) <= set(state)
    # A resume as fit() does it: prepare() (here on other data, so the state must come from the checkpoint),
    # load_state_dict, then the next epoch's hook on both.
    other_old, other_labels = train_set(seed=9)
    resumed = build_method(name, embedding_dim=D, num_classes=C)
    resumed.prepare(torch.from_numpy(other_old), torch.from_numpy(other_labels))
    resumed.load_state_dict(state)
    for key in STATE[name]:
        assert torch.equal(resumed.state_dict()[key], state[key]), key
    for m in (method, resumed):
        m.on_epoch_start(4, 10, lambda: torch.randn(len(other_labels), D))  # UniBCT: on, no refresh at 4
    new2, old2, labels2 = batch(seed=20)
    assert torch.allclose(resumed(new2, labels2, old2)["loss"], method(new2, labels2, old2)["loss"])


# ------------------------------------------------------------------------------------------ through the loop


def _loop_task(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from components.task import CompatibleTask

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, D))
    return CompatibleTask(backbone, build_method(name, embedding_dim=D, num_classes=C, seed=0)), backbone


@pytest.mark.parametrize("name", BASELINES)
def test_fit_interrupted_and_resumed_reaches_the_same_state(name: str, tmp_path) -> None:
    """fit() calls prepare / on_epoch_start and checkpoints task.state_dict(): a run stopped after epoch 2 of 3
    (UniBCT switched on and refined at epoch 1) and resumed with fresh objects ends where the full run ends."""
    from components.train import LoopConfig, TrainArrays, fit

    old_all, labels_all = train_set()
    images = np.random.default_rng(2).integers(0, 255, size=(len(labels_all), 8, 8), dtype=np.uint8)
    data = TrainArrays(images, labels_all, old_all, np.ones(len(labels_all), dtype=bool))
    cfg = LoopConfig(epochs=3, batch_size=6, lr=0.05, seed=1)
    full, full_backbone = _loop_task(name)
    history = fit(full, full_backbone, data, cfg, tmp_path / "full.pt")
    assert all(np.isfinite(h["loss"]) for h in history)

    class Stop(Exception):
        pass

    def stop_after_second(record: dict) -> None:
        if record["epoch"] == 2:
            raise Stop

    interrupted, interrupted_backbone = _loop_task(name)
    with pytest.raises(Stop):
        fit(interrupted, interrupted_backbone, data, cfg, tmp_path / "ck.pt", on_epoch=stop_after_second)
    resumed, resumed_backbone = _loop_task(name)
    fit(resumed, resumed_backbone, data, cfg, tmp_path / "ck.pt")
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), key
