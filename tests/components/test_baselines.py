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
VARIANTS = ["bct_authors", "unibct_authors", "nccl_authors", "lce_authors"]  # the MixBCT authors' (labelled)


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


def ref_iqr_inliers(values: list[float]) -> list[float]:
    """Reference 1.5·IQR outlier removal in plain Python (AdvBCT's quartile convention)."""
    r = sorted(values)
    n = len(r)
    if n >= 4:
        q1, q3 = r[n // 4], r[(3 * n) // 4]
        iqr = q3 - q1
        r = [v for v in r if q1 - 1.5 * iqr <= v <= q3 + 1.5 * iqr]
    return r


def ref_iqr_max(values: list[float]) -> float:
    return max(ref_iqr_inliers(values))


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
    assert set(BASELINES + VARIANTS) <= set(available_methods())
    for name in BASELINES + VARIANTS:
        method = build_method(name, embedding_dim=D, num_classes=C, s=64.0, m=0.5, seed=0, args={})
        assert method.needs_old_features, name


@pytest.mark.parametrize("name", ["bct", "unibct", "advbct", "lce", "bct_authors", "unibct_authors", "lce_authors"])
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


def ref_influence(n: np.ndarray, labels: torch.Tensor, protos, scale: float) -> float:
    """Mean CE of the scaled dot products of the normalised new rows with each prototype."""
    return float(
        np.mean(
            [
                cross_entropy([scale * float(np.dot(unit(n[i]), p)) for p in protos], int(labels[i]))
                for i in range(len(n))
            ]
        )
    )


@pytest.mark.parametrize(("name", "scale"), [("bct", 64.0), ("bct_authors", 1.0)])
def test_bct_influence_loss_matches_hand_reference(name: str, scale: float) -> None:
    """BCT: the logits at the ArcFace scale s = 64 (method.md); the MixBCT authors' variant drops s."""
    old_all, labels_all = train_set()
    new, old, labels = batch()
    method = build_method(name, embedding_dim=D, num_classes=C)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    protos = ref_centres(old_all.astype(np.float64), labels_all, C)  # no old head: every class synthesised
    n = new.numpy().astype(np.float64)
    influence = ref_influence(n, labels, protos, scale)
    out = method(new, labels, old)
    expected = reference_arcface(n, head_weight(method), labels.numpy(), 64.0, 0.5) + influence
    assert close(out["loss"].item(), expected)
    assert close(out["influence"].item(), influence)
    assert np.allclose(method.prototypes.numpy(), np.stack(protos), atol=1e-6)
    assert torch.allclose(method.prototypes.norm(dim=1), torch.ones(C))


@pytest.mark.parametrize("name", ["bct", "unibct"])
def test_bct_head_uses_the_old_classifier_rows_of_known_classes_and_synthesises_the_rest(name: str) -> None:
    old_all, labels_all = train_set()
    rows = torch.tensor(np.random.default_rng(5).normal(size=(C, D)) * 7.0, dtype=torch.float32)  # unnormalised
    known = torch.tensor([True, False, True])
    method = build_method(name, embedding_dim=D, num_classes=C)
    assert method.accepts_old_classifier
    method.set_old_classifier(rows, known)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    method.on_epoch_start(3, 10, lambda: torch.randn(len(labels_all), D))  # UniBCT: on, refined at switch-on

    synthesised = ref_centres(old_all.astype(np.float64), labels_all, C)
    r = rows.numpy().astype(np.float64)
    protos = [unit(r[0]), synthesised[1], unit(r[2])]  # old head's rows for 0 and 2, class mean for 1
    assert np.allclose(method.prototypes.numpy(), np.stack(protos), atol=1e-6)
    new, old, labels = batch()
    n = new.numpy().astype(np.float64)
    logits = (method.prototypes @ torch.nn.functional.normalize(new, dim=1).t()).t() * 64.0  # [B, C]
    for i in range(B):
        for c in range(C):
            assert close(float(logits[i, c]), 64.0 * float(np.dot(unit(n[i]), protos[c])), 1e-5)
    assert close(method(new, labels, old)["influence"].item(), ref_influence(n, labels, protos, 64.0))


def test_old_classifier_is_checked_and_only_given_before_prepare() -> None:
    old_all, labels_all = train_set()
    rows, known = torch.randn(C, D), torch.tensor([True, False, False])
    method = build_method("bct", embedding_dim=D, num_classes=C)
    with pytest.raises(ValueError, match=r"must be \[3, 4\]"):
        method.set_old_classifier(torch.randn(C, D + 1), known)
    with pytest.raises(ValueError, match="bool tensor"):
        method.set_old_classifier(rows, torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="zero"):
        method.set_old_classifier(torch.zeros(C, D), known)
    method.set_old_classifier(torch.cat([rows[:1], torch.full((2, D), float("nan"))]), known)  # unknown: not read
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    assert torch.isfinite(method.prototypes).all()
    with pytest.raises(RuntimeError, match="before prepare"):
        method.set_old_classifier(rows, known)
    for name in ["bct_authors", "unibct_authors", "l2", "nccl", "advbct", "lce", "mixbct", "none"]:
        other = build_method(name, embedding_dim=D, num_classes=C)
        assert not other.accepts_old_classifier, name
        with pytest.raises(TypeError, match="does not use the old classifier"):
            other.set_old_classifier(rows, known)


# ------------------------------------------------------------------------------------------ UniBCT


def ref_refine(
    new_all: np.ndarray, old_all: np.ndarray, labels_all: np.ndarray, n_classes: int, normalise: bool = True
) -> np.ndarray:
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
        mean = refined.mean(axis=0)
        protos.append(unit(mean) if normalise else mean)
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


def test_unibct_authors_variant_loads_unnormalised_refined_means_at_scale_1() -> None:
    old_all, labels_all = train_set((7, 7, 9), seed=3)
    new_all = torch.tensor(np.random.default_rng(4).normal(size=(len(labels_all), D)), dtype=torch.float32)
    method = build_method("unibct_authors", embedding_dim=D, num_classes=C)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    method.on_epoch_start(3, 10, lambda: new_all)
    expected = ref_refine(new_all.numpy().astype(np.float64), old_all.astype(np.float64), labels_all, C, False)
    assert np.allclose(method.prototypes.numpy(), expected, atol=1e-5)
    assert (method.prototypes.norm(dim=1) < 0.999).all()  # a mean of unit vectors that do not coincide
    new, old, labels = batch()
    n = new.numpy().astype(np.float64)
    out = method(new, labels, old)
    assert close(out["influence"].item(), ref_influence(n, labels, list(expected), 1.0))


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


def ref_margin(cos: float, m: float = 0.5) -> float:
    """ArcFace's target cosine (no easy margin): cos(θ + m) while θ + m < π, else cos θ − m·sin(π − m)."""
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return math.cos(theta + m) if theta + m < math.pi else cos - math.sin(math.pi - m) * m


def ref_logit_vector(x: np.ndarray, y: int, wn: list[np.ndarray]) -> np.ndarray:
    """The ArcFace head's logit vector of feature x with label y, over s (the scale cancels in a cosine)."""
    z = np.array([float(np.dot(unit(x), wc)) for wc in wn])
    z[y] = ref_margin(z[y])
    return z


def ref_nccl_step(
    queue: list[tuple[np.ndarray, int]], new, old, labels, w, size: int, temperature: float
) -> tuple[float, float]:
    """Enqueue the batch (FIFO, last `size` kept), then both contrastive terms at `temperature`; the logit term
    compares the ArcFace logit vectors (margin on each vector's own label) by cosine."""
    for o, y in zip(old, labels, strict=True):
        queue.append((unit(o), int(y)))
    del queue[: max(0, len(queue) - size)]
    qf, ql = [q for q, _ in queue], [y for _, y in queue]
    wn = [unit(w[c]) for c in range(len(w))]
    sims, cos, weights = [], [], []
    for i in range(len(new)):
        ni, oi = unit(new[i]), unit(old[i])
        zi = ref_logit_vector(new[i], int(labels[i]), wn)
        sims.append([float(np.dot(ni, q)) / temperature for q in qf])
        weights.append([0.5 * (1.0 + float(np.dot(oi, q))) for q in qf])
        row = []
        for q, yq in zip(qf, ql, strict=True):
            zq = ref_logit_vector(q, yq, wn)
            row.append(float(np.dot(zi, zq)) / (np.linalg.norm(zi) * np.linalg.norm(zq)) / temperature)
        cos.append(row)
    ys = [int(y) for y in labels]
    return ref_supcon(sims, ys, ql, weights), ref_supcon(cos, ys, ql, weights)


@pytest.mark.parametrize(("name", "temperature"), [("nccl", 0.05), ("nccl_authors", 1.0)])
def test_nccl_matches_hand_reference_over_two_steps_with_wraparound(name: str, temperature: float) -> None:
    """NCCL at τ = 0.05 (method.md's default); the MixBCT authors' variant at τ = 1."""
    method = build_method(name, embedding_dim=D, num_classes=C, args={"queue_size": 8})
    assert method.temperature == temperature
    queue: list[tuple[np.ndarray, int]] = []
    for step in range(2):
        new, old, labels = batch(seed=10 + step)
        out = method(new, labels, old)
        feat, logit = ref_nccl_step(
            queue, new.numpy().astype(np.float64), old.numpy().astype(np.float64), labels.numpy(),
            head_weight(method), size=8, temperature=temperature,
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
    o_all = old_all.astype(np.float64)
    centres = ref_centres(o_all, labels_all, C)
    new[0] = torch.tensor(3.0 * centres[0])  # on its class centre: inside the boundary, not a violating sample
    new[4] = torch.tensor(0.5 * centres[1])
    out = method(new, labels, old)

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
    violating = [v for v in p2s if v > 0]
    assert 0 < len(violating) < B and p2s[0] == p2s[4] == 0.0
    p2s_term = sum(violating) / len(violating)  # per violating sample (method.md), not per batch row
    decay = (5 - 2 + 1) / 5
    expected = reference_arcface(n, head_weight(method), labels.numpy(), 64.0, 0.5) + 4 * p2s_term + 4 * decay * adv
    assert close(out["p2s"].item(), p2s_term) and close(out["adv"].item(), float(adv))
    assert close(out["loss"].item(), float(expected))


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    y = GradReverse.apply(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)


# ------------------------------------------------------------------------------------------ LCE


def ref_iqr_min(values: list[float]) -> float:
    return min(ref_iqr_inliers(values))


@pytest.mark.parametrize(
    ("name", "args", "k"), [("lce", {}, 4.0), ("lce", {"weight_scale": 16.0}, 16.0), ("lce_authors", {}, 1.0)]
)
def test_lce_matches_hand_reference(name: str, args: dict, k: float) -> None:
    """Boundary + 100 · MSE alignment, both × k: s/16 = 4 by default at s = 64, swept ×16; the authors' ×1."""
    old_all, labels_all = train_set()
    method = build_method(name, embedding_dim=D, num_classes=C, args=args)
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    new, old, labels = batch()
    o_all = old_all.astype(np.float64)
    centres = ref_centres(o_all, labels_all, C)
    new[0] = torch.tensor(2.0 * centres[0])  # cosine 1 to its old centre: inside the boundary
    out = method(new, labels, old)

    cos_min, raw_min = [], []
    for c in range(C):
        cos = [float(np.dot(unit(o_all[j]), centres[c])) for j in range(len(o_all)) if labels_all[j] == c]
        cos_min.append(ref_iqr_min(cos))
        raw_min.append(min(cos))
    assert cos_min[0] > raw_min[0]  # class 0's outlier is not its boundary
    assert np.allclose(method.cos_min.numpy(), cos_min, atol=1e-5)
    n, w = new.numpy().astype(np.float64), head_weight(method)
    ys = [int(y) for y in labels]
    boundary = [max(cos_min[ys[i]] - float(np.dot(centres[ys[i]], unit(n[i]))), 0.0) for i in range(B)]
    assert boundary[0] == 0.0 and max(boundary) > 0.0
    align = sum(float(v) ** 2 for c in range(C) for v in unit(w[c]) - centres[c]) / (C * D)  # every class, C·d terms
    assert close(out["boundary"].item(), float(np.mean(boundary))) and close(out["align"].item(), align)
    expected = reference_arcface(n, w, labels.numpy(), 64.0, 0.5) + k * 1.0 * np.mean(boundary) + k * 100.0 * align
    assert close(out["loss"].item(), float(expected))


# ------------------------------------------------------------------------------------------ all methods


def ready(name: str, old_head: bool = False) -> torch.nn.Module:
    """A method after prepare() and, for UniBCT, at its switch-on epoch (head on); `old_head`: BCT and UniBCT
    get the old classifier's rows for classes 0 and 2."""
    old_all, labels_all = train_set()
    method = build_method(name, embedding_dim=D, num_classes=C)
    if old_head:
        method.set_old_classifier(torch.randn(C, D), torch.tensor([True, False, True]))
    method.prepare(torch.from_numpy(old_all), torch.from_numpy(labels_all))
    new_all = torch.tensor(np.random.default_rng(7).normal(size=(len(labels_all), D)), dtype=torch.float32)
    method.on_epoch_start(3, 10, lambda: new_all)
    return method


@pytest.mark.parametrize("name", BASELINES + VARIANTS)
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
    "bct": ["prototypes", "known"],
    "unibct": ["prototypes", "known", "refined_epoch"],
    "nccl": ["queue_features", "queue_labels", "queue_ptr", "queue_filled"],
    "advbct": ["centres", "radii", "boundary", "discriminator.0.weight", "discriminator.1.running_mean"],
    "lce": ["centres", "cos_min"],
}


@pytest.mark.parametrize("name", sorted(STATE))
def test_state_that_must_survive_resume_is_in_state_dict(name: str) -> None:
    method = ready(name, old_head=name in ("bct", "unibct"))  # the resumed one is not given the old head again
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
