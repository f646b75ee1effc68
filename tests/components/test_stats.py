"""Bootstrap intervals, exact resampled TAR@FAR, negative flips and partial backfill on small synthetic cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.evaluate import retrieval_metrics, set_threads, tar_name, verification_metrics
from components.plots import backfill_png
from components.stats import (
    PairScores,
    backfill_curve,
    backfill_curves,
    backfill_order,
    bootstrap_intervals,
    collect_pair_scores,
    confusability,
    identity_resamples,
    negative_flips,
    pair_scores,
    score_tail,
    tar_at_far,
)

TAR3 = tar_name(1e-3)


@pytest.fixture(autouse=True, scope="module")
def _threads() -> None:
    set_threads(1)


def unit(deg: float | list[float]) -> np.ndarray:
    """Points on the unit circle [n, 2]: cosine between two of them = cos(angle difference)."""
    a = np.deg2rad(np.atleast_1d(deg))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def clustered(n_id: int, q_per_id: int, g_per_id: int, d: int, noise: float, seed: int):
    """Identity centres plus noise: (xq, yq, xb, yb), a hard enough task that TARs sit strictly inside (0, 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_id, d)).astype(np.float32)
    yq, yb = np.repeat(np.arange(n_id), q_per_id), np.repeat(np.arange(n_id), g_per_id)
    xq = centres[yq] + noise * rng.normal(size=(len(yq), d)).astype(np.float32)
    xb = centres[yb] + noise * rng.normal(size=(len(yb), d)).astype(np.float32)
    return xq, yq, xb, yb


def outcomes(top1: np.ndarray) -> PairScores:
    return PairScores(per_query={"top1": np.asarray(top1, dtype=bool)})


# ----------------------------------------------------------------------------------------------- resampling


def test_identities_are_the_resampling_unit() -> None:
    yq = np.array(["a", "a", "b", "c", "c", "c"])
    w = identity_resamples(yq, n_resamples=500, seed=3)
    assert w.shape == (500, 6) and w.dtype == np.int32
    # the queries of one identity always move together
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all() and (w[:, 4] == w[:, 5]).all()
    # each resample draws exactly three identities
    assert (w[:, 0] + w[:, 2] + w[:, 3] == 3).all()
    # so the share of queries of "c" in a resample is a multiple of its 3 queries, never 1 or 2 of them
    assert set(np.unique(w[:, 3:].sum(axis=1) % 3)) == {0}
    assert np.array_equal(w, identity_resamples(yq, n_resamples=500, seed=3))
    assert not np.array_equal(w, identity_resamples(yq, n_resamples=500, seed=4))


def test_interval_of_a_difference_covers_the_truth() -> None:
    """Two "models" whose per-identity top-1 correctness is Bernoulli(p1) and Bernoulli(p2), correlated through a
    shared uniform; each identity has 2 queries that share its outcome. True difference of top-1: p1 − p2."""
    p1, p2, n_id, repeats = 0.75, 0.65, 150, 200
    rng = np.random.default_rng(0)
    covered95 = covered50 = 0
    yq = np.repeat(np.arange(n_id), 2)
    for i in range(repeats):
        u = rng.random(n_id)
        v = np.where(rng.random(n_id) < 0.5, u, rng.random(n_id))  # half the identities share the draw
        pairs = {"a": outcomes((u < p1)[yq]), "b": outcomes((v < p2)[yq])}
        boot = bootstrap_intervals(pairs, yq, diffs=[("a", "b")], n_resamples=1000, seed=i)
        iv = boot.differences["a - b"]["top1"]
        covered95 += iv.lo <= p1 - p2 <= iv.hi
        lo50, hi50 = np.quantile(boot.samples["a - b", "top1"], [0.25, 0.75])
        covered50 += lo50 <= p1 - p2 <= hi50
    assert covered95 / repeats >= 0.90, covered95
    assert covered50 / repeats < 0.70, covered50  # a too-narrow interval fails the same check: the test can fail


def test_paired_difference_is_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(1)
    n_id = 300
    yq = np.repeat(np.arange(n_id), 2)
    a = rng.random(n_id) < 0.7
    b = np.where(rng.random(n_id) < 0.9, a, rng.random(n_id) < 0.6)  # b agrees with a on ~90% of identities
    pairs = {"a": outcomes(a[yq]), "b": outcomes(b[yq])}
    paired = bootstrap_intervals(pairs, yq, diffs=[("a", "b")], seed=0)
    other = bootstrap_intervals(pairs, yq, seed=1)  # independent resamples for b: the unpaired difference
    unpaired = paired.samples["a", "top1"] - other.samples["b", "top1"]
    width_paired = np.subtract(*np.quantile(paired.samples["a - b", "top1"], [0.975, 0.025]))
    width_unpaired = np.subtract(*np.quantile(unpaired, [0.975, 0.025]))
    assert width_paired < 0.6 * width_unpaired, (width_paired, width_unpaired)
    iv = paired.differences["a - b"]["top1"]
    assert iv.point == pytest.approx(a.mean() - b.mean())
    assert iv.hi - iv.lo == pytest.approx(width_paired)


# --------------------------------------------------------------------------------------------- TAR at FAR


@pytest.mark.parametrize("max_pairs", [20_000_000, 30_000])  # all impostor pairs; evaluate's Bernoulli sample
def test_tail_tar_equals_exact_roc_tar(max_pairs: int) -> None:
    xq, yq, xb, yb = clustered(n_id=120, q_per_id=3, g_per_id=2, d=16, noise=1.2, seed=0)  # 360 × 240 pairs
    fars = (1e-4, 1e-3, 1e-2, 0.2)
    exact, _ = verification_metrics(xq, yq, xb, yb, fars=fars, max_pairs=max_pairs, seed=5)
    ours = tar_at_far(score_tail(xq, yq, xb, yb, fars=fars, max_pairs=max_pairs, seed=5))
    assert 0 < exact[tar_name(1e-3)] < 1
    # same scores, same pairs, same definition: equal, not merely close
    assert ours.tolist() == [exact[tar_name(f)] for f in fars]


def test_tail_tar_with_ties_and_unresolvable_far() -> None:
    xq, yq, xb, yb = clustered(n_id=40, q_per_id=2, g_per_id=1, d=4, noise=1.0, seed=1)
    xq, xb = np.round(xq, 0), np.round(xb, 0)  # few distinct vectors: many tied scores
    fars = (1e-4, 1e-2, 0.1, 1.0)  # 3,120 impostor pairs: 1e-4 cannot be resolved (NaN)
    exact, _ = verification_metrics(xq, yq, xb, yb, fars=fars)
    ours = tar_at_far(score_tail(xq, yq, xb, yb, fars=fars))
    assert np.isnan(ours[0]) and np.isnan(exact[tar_name(1e-4)])
    assert ours[1:].tolist() == [exact[tar_name(f)] for f in fars[1:]]


def test_resampled_tar_equals_exact_tar_of_the_resampled_test_set() -> None:
    """Under a resample, TAR equals verification_metrics run on the resampled queries (each repeated w times)."""
    xq, yq, xb, yb = clustered(n_id=60, q_per_id=2, g_per_id=2, d=8, noise=1.0, seed=2)
    fars = (1e-3, 1e-2)
    tail = score_tail(xq, yq, xb, yb, fars=fars)
    w = identity_resamples(yq, n_resamples=5, seed=0)
    ours = tar_at_far(tail, w)
    for r in range(len(w)):
        rows = np.repeat(np.arange(len(yq)), w[r])
        exact, _ = verification_metrics(xq[rows], yq[rows], xb, yb, fars=fars)
        assert ours[r].tolist() == [exact[tar_name(f)] for f in fars]


def test_too_short_tail_is_an_error_not_a_number() -> None:
    xq, yq, xb, yb = clustered(n_id=50, q_per_id=2, g_per_id=1, d=8, noise=1.0, seed=3)
    tail = score_tail(xq, yq, xb, yb, fars=(0.1,), tail_margin=1.0, tail_min=0)
    assert not tail.complete
    # only the query with the fewest impostors in the tail: its threshold lies below the kept tail
    per_query = np.bincount(tail.impostor_query, minlength=len(yq))
    q = int(np.argmin(per_query))
    w = np.zeros((1, len(yq)), dtype=np.int32)
    w[0, q] = 1
    assert per_query[q] <= int(0.1 * tail.n_impostor[q])
    with pytest.raises(ValueError, match="tail_margin"):
        tar_at_far(tail, w)


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_points_match_evaluate_and_intervals_hold_them() -> None:
    xq, yq, xb, yb = clustered(n_id=80, q_per_id=2, g_per_id=1, d=8, noise=1.0, seed=4)
    rng = np.random.default_rng(0)
    features = {"old": (xq, xb), "new": (xq + 0.3 * rng.normal(size=xq.shape).astype(np.float32), xb)}
    pairs = collect_pair_scores(features, yq, yb, [("old", "old"), ("new", "old")], fars=(1e-2, 1e-1))
    boot = bootstrap_intervals(
        pairs, yq, diffs=[("new/old", "old/old")], flips=[("old/old", "new/old")], n_resamples=200
    )
    ret = retrieval_metrics(features["new"][0], yq, xb, yb)
    ver, _ = verification_metrics(features["new"][0], yq, xb, yb, fars=(1e-2, 1e-1))
    row = boot.intervals["new/old"]
    assert set(row) == {"top1", "top5", "mAP", tar_name(1e-2), tar_name(1e-1)}
    assert {m: row[m].point for m in ret} == ret
    assert {m: row[m].point for m in ver} == ver
    for name, metrics in (*boot.intervals.items(), *boot.differences.items(), *boot.flips.items()):
        for m, iv in metrics.items():
            assert iv.lo <= iv.point <= iv.hi, (name, m, iv)
    diff = boot.differences["new/old - old/old"]["top1"]
    assert diff.point == pytest.approx(row["top1"].point - boot.intervals["old/old"]["top1"].point)
    assert np.array_equal(
        boot.samples["new/old - old/old", "top1"], boot.samples["new/old", "top1"] - boot.samples["old/old", "top1"]
    )
    again = bootstrap_intervals(
        pairs, yq, diffs=[("new/old", "old/old")], flips=[("old/old", "new/old")], n_resamples=200
    )
    assert again.to_dict() == boot.to_dict()  # seeded: deterministic
    text = json.dumps(boot.to_dict())
    assert "new/old - old/old" in text and "old/old -> new/old" in text
    assert "| new/old " in boot.markdown()


def test_open_set_queries_are_left_out_of_retrieval_only() -> None:
    xq, yq, xb, yb = clustered(n_id=30, q_per_id=2, g_per_id=1, d=8, noise=0.8, seed=5)
    known = yq < 20
    ps = pair_scores(xq, yq, xb[yb < 20], yb[yb < 20], fars=(1e-2,), retrieval_queries=known)
    boot = bootstrap_intervals({"p": ps}, yq, n_resamples=50)
    expected = retrieval_metrics(xq[known], yq[known], xb[yb < 20], yb[yb < 20])
    assert boot.intervals["p"]["top1"].point == expected["top1"]
    assert boot.intervals["p"]["mAP"].point == expected["mAP"]


def test_bootstrap_rejects_unknown_pairs_and_mismatched_queries() -> None:
    yq = np.arange(4)
    with pytest.raises(ValueError, match="unknown pair"):
        bootstrap_intervals({"a": outcomes([1, 0, 1, 0])}, yq, diffs=[("a", "b")])
    with pytest.raises(ValueError, match="3 queries"):
        bootstrap_intervals({"a": outcomes([1, 0, 1])}, yq)


# --------------------------------------------------------------------------------------------- negative flips


def test_negative_flips_hand_made() -> None:
    ref = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    cand = np.array([1, 0, 0, 1, 1, 0], dtype=bool)  # queries 1 and 2 flip; query 4 is a positive flip
    assert negative_flips(ref, cand) == {"nfr": 2 / 6, "nf_share": 2 / 4}
    assert negative_flips(cand, cand) == {"nfr": 0.0, "nf_share": 0.0}
    assert np.isnan(negative_flips(np.zeros(3, bool), np.ones(3, bool))["nf_share"])

    yq = np.array([0, 0, 1, 1, 2, 2])  # the two flipping queries belong to two identities
    boot = bootstrap_intervals(
        {"old/old": outcomes(ref), "new/old": outcomes(cand)}, yq, flips=[("old/old", "new/old")]
    )
    flips = boot.flips["old/old -> new/old"]
    assert flips["nfr"].point == 2 / 6 and flips["nf_share"].point == 2 / 4
    assert flips["nfr"].lo <= 2 / 6 <= flips["nfr"].hi
    # every flip sits in identities 0 and 1 (one each), so no resample has more flips than both of them drawn
    assert boot.samples["old/old -> new/old", "nfr"].max() <= 0.5 + 1e-12


# ------------------------------------------------------------------------------------------ partial backfill


def upgrade(seed: int = 6):
    """Old and new features of the same images: new = a rotated, less noisy view (so new/old is poor)."""
    xq_old, yq, xb_old, yb = clustered(n_id=60, q_per_id=2, g_per_id=1, d=8, noise=1.0, seed=seed)
    rng = np.random.default_rng(seed)
    rot = np.linalg.qr(rng.normal(size=(8, 8)))[0].astype(np.float32)
    mix = (0.6 * np.eye(8) + 0.4 * rot).astype(np.float32)
    return xq_old @ mix, yq, xb_old, xb_old @ mix + 0.1 * rng.normal(size=xb_old.shape).astype(np.float32), yb


def test_backfill_endpoints_are_new_old_and_new_new() -> None:
    xq_new, yq, xb_old, xb_new, yb = upgrade()
    old_old = {"top1": 0.5, TAR3: 0.5}
    curves = backfill_curves(xq_new, yq, xb_old, xb_new, yb, old_old, betas=(0.0, 0.5, 1.0))
    new_old = {**retrieval_metrics(xq_new, yq, xb_old, yb), **verification_metrics(xq_new, yq, xb_old, yb)[0]}
    new_new = {**retrieval_metrics(xq_new, yq, xb_new, yb), **verification_metrics(xq_new, yq, xb_new, yb)[0]}
    for curve in curves.values():
        for m in ("top1", TAR3):
            assert curve.values[m][0] == new_old[m]
            assert curve.values[m][-1] == new_new[m]
    assert new_old["top1"] != new_new["top1"]  # the endpoints are distinguishable
    # an interior point is evaluate's number on the mixed gallery too
    order = backfill_order(xb_old, yb, "worst_first")
    xb = xb_old.copy()
    xb[order[:30]] = xb_new[order[:30]]
    mid = curves["worst_first"]
    assert mid.n_backfilled == (0, 30, 60)
    assert mid.values["top1"][1] == retrieval_metrics(xq_new, yq, xb, yb)["top1"]
    assert mid.values[TAR3][1] == verification_metrics(xq_new, yq, xb, yb)[0][TAR3]
    assert json.loads(json.dumps(mid.to_dict()))["order"] == "worst_first"
    assert "AUC" in mid.markdown()


def test_worst_first_starts_with_the_most_confusable_rows() -> None:
    # rows 1 (B) and 3 (C) are 3° apart: the pair the old model separates worst; row 4 is alone on the circle
    xb_old = unit([0, 100, 40, 103, 250, 10])
    yb = np.array(["A", "B", "A", "C", "D", "A"])  # rows 0, 2, 5 share identity A: never each other's impostor
    conf = confusability(xb_old, yb)
    assert conf[1] == pytest.approx(np.cos(np.deg2rad(3)))
    order = backfill_order(xb_old, yb, "worst_first")
    assert order[:2].tolist() == [1, 3] and order[-1] == 4
    random = backfill_order(xb_old, yb, "random", seed=0)
    assert sorted(random.tolist()) == list(range(6))
    assert np.array_equal(random, backfill_order(xb_old, yb, "random", seed=0))
    with pytest.raises(ValueError, match="known"):
        backfill_order(xb_old, yb, "best_first")


def test_a_dipping_curve_is_reported_as_dipping(tmp_path) -> None:
    # Each model alone ranks correctly; mixed, new rows of the other identity outrank the query's own old row.
    xq_new, yq = unit([0, 100]), np.array(["A", "B"])
    xb_old, xb_new, yb = unit([40, 80]), unit([5, 20]), np.array(["A", "B"])
    old_old = {"top1": 0.5, TAR3: 0.0}
    curve = backfill_curve(xq_new, yq, xb_old, xb_new, yb, old_old, order=np.array([1, 0]), betas=(0, 0.5, 1))
    assert curve.order == "custom"
    assert curve.values["top1"] == (1.0, 0.0, 1.0)
    assert curve.dips and curve.dips_by_metric == {"top1": True, TAR3: False}  # 2 impostor pairs: TAR NaN
    assert curve.minimum["top1"] == (0.0, 0.5)
    assert curve.auc["top1"] == pytest.approx(0.5)
    assert "dips below old/old" in curve.markdown()
    calm = backfill_curve(xq_new, yq, xb_old, xb_new, yb, {"top1": 0.0, TAR3: 0.0}, order=np.array([1, 0]))
    assert not calm.dips
    png = backfill_png({"custom": curve}, old_old, tmp_path / "backfill.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backfill_rejects_bad_input() -> None:
    xq_new, yq, xb_old, xb_new, yb = upgrade()
    old_old = {"top1": 0.5, TAR3: 0.5}
    with pytest.raises(ValueError, match="betas"):
        backfill_curve(xq_new, yq, xb_old, xb_new, yb, old_old, betas=(0.5, 0.2))
    with pytest.raises(ValueError, match="permutation"):
        backfill_curve(xq_new, yq, xb_old, xb_new, yb, old_old, order=np.zeros(len(yb), int))
    with pytest.raises(ValueError, match="old_old lacks"):
        backfill_curve(xq_new, yq, xb_old, xb_new, yb, {"top1": 0.5})


@pytest.mark.slow
def test_default_size_bootstrap_is_fast_and_small() -> None:
    """5 pairs × 6 metrics at the default test split (4,000 queries, 2,000 gallery, d = 128), 1,000 resamples:
    measured ~6 s on 2 cores (pair scores ~4.3 s, resampling ~1.5 s; ~13 s under tracemalloc), asserted with margin."""
    import time
    import tracemalloc

    set_threads(2)
    rng = np.random.default_rng(0)
    xq, yq, xb, yb = clustered(n_id=2000, q_per_id=2, g_per_id=1, d=128, noise=1.8, seed=0)
    features = {
        name: (
            xq + 0.5 * rng.normal(size=xq.shape).astype(np.float32),
            xb + 0.5 * rng.normal(size=xb.shape).astype(np.float32),
        )
        for name in ("old", "new", "paragon")
    }
    pairs = [("old", "old"), ("new", "old"), ("new", "new"), ("paragon", "paragon"), ("paragon", "old")]
    tracemalloc.start()
    start = time.perf_counter()
    scores = collect_pair_scores(features, yq, yb, pairs)
    boot = bootstrap_intervals(
        scores, yq, diffs=[("new/old", "old/old"), ("new/new", "old/old")], flips=[("old/old", "new/old")]
    )
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    set_threads(1)
    assert elapsed < 60, elapsed
    assert peak < 1 << 30, peak
    assert all(len(row) == 6 for row in boot.intervals.values())
    exact, _ = verification_metrics(features["new"][0], yq, features["old"][1], yb)
    assert {m: boot.intervals["new/old"][m].point for m in exact} == exact
