"""Retrieval, verification and compatibility-criterion properties on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from components.evaluate import (
    METRICS,
    CompatibilityTable,
    compatibility_table,
    criterion,
    evaluate_pair,
    pair_name,
    per_query_retrieval,
    retrieval_metrics,
    sample_pairs,
    set_threads,
    tar_name,
    verification_metrics,
    verification_pairs,
)
from markdown_cells import content


def unit(deg: float | np.ndarray) -> np.ndarray:
    """Points on the unit circle [n, 2]: cosine between two of them = cos(angle difference)."""
    a = np.deg2rad(np.atleast_1d(deg))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def perfect(n_id: int = 10, per_id: int = 20, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Each identity is one basis direction, scaled arbitrarily: cosine 1 within, 0 across identities."""
    y = np.repeat(np.arange(n_id), per_id)
    x = np.eye(d, dtype=np.float32)[y] * np.linspace(0.5, 3.0, len(y), dtype=np.float32)[:, None]
    return x, y


@pytest.fixture(autouse=True, scope="module")
def _threads() -> None:
    set_threads(1)


def test_metric_names() -> None:
    assert METRICS == ("top1", "top5", "mAP", "tar@far=1e-4", "tar@far=1e-3", "tar@far=1e-2")
    assert tar_name(0.25) == "tar@far=2.5e-1"
    assert pair_name("new", "old") == "new/old"


def test_perfect_embeddings_score_one() -> None:
    x, y = perfect()  # 200 x 200 pairs: 36,000 impostors resolve FAR 1e-4
    m = evaluate_pair(x, y, x, y)
    assert set(m) == set(METRICS)
    assert all(v == pytest.approx(1.0) for v in m.values()), m


def test_hand_made_ranks_give_exact_ap() -> None:
    # gallery on the unit circle at 10..50 degrees; a query's ranking is by angular distance
    xb, yb = unit([10, 20, 30, 40, 50]), np.array(["A", "B", "A", "C", "B"])
    xq, yq = unit([0, 60, 27]), np.array(["A", "B", "C"])
    # q0 (0°):  g0 A, g1 B, g2 A, g3 C, g4 B -> relevant at 1, 3 -> AP = (1/1 + 2/3) / 2 = 5/6
    # q1 (60°): g4 B, g3 C, g2 A, g1 B, g0 A -> relevant at 1, 4 -> AP = (1/1 + 2/4) / 2 = 3/4
    # q2 (27°): g2 A, g1 B, g3 C, g0 A, g4 B -> relevant at 3    -> AP = 1/3
    pq = per_query_retrieval(xq, yq, xb, yb, ks=(1, 2, 3))
    np.testing.assert_allclose(pq["AP"], [5 / 6, 3 / 4, 1 / 3])
    np.testing.assert_array_equal(pq["top1"], [True, True, False])
    np.testing.assert_array_equal(pq["top3"], [True, True, True])
    m = retrieval_metrics(xq, yq, xb, yb, ks=(1, 2, 3))
    assert m["mAP"] == pytest.approx(23 / 36)
    assert (m["top1"], m["top2"], m["top3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    # truncated at depth 2: AP@2 = hits·precision / min(n_relevant, 2) = 1/2, 1/2, 0
    assert retrieval_metrics(xq, yq, xb, yb, map_cutoff=2)["mAP"] == pytest.approx(1 / 3)


def test_top5_at_least_top1_and_inputs_untouched() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 30, size=300)
    xb = rng.normal(size=(300, 8)).astype(np.float32)
    xq = xb + rng.normal(scale=2.0, size=xb.shape).astype(np.float32)
    before = xq.copy()
    pq = per_query_retrieval(xq, y, xb, y)
    assert np.all(pq["top5"] >= pq["top1"])
    assert pq["top5"].mean() > pq["top1"].mean()  # noisy enough that the two differ
    np.testing.assert_array_equal(xq, before)  # features are normalised on a copy


def test_swapped_gallery_labels_give_known_top1() -> None:
    x, y = perfect(n_id=4, per_id=5)
    yb = y.copy()
    yb[y == 0], yb[y == 1] = 1, 0  # identities 0 and 1 swap their gallery labels
    m = retrieval_metrics(x, y, x, yb)
    assert m["top1"] == pytest.approx(0.5)  # queries of 0 and 1 (half of them) find only the other identity
    assert m["top5"] == pytest.approx(0.5)  # their 5 nearest are all the wrong identity


def test_tar_at_far_matches_hand_computation() -> None:
    genuine = [0.9, 0.8, 0.6, 0.3]
    impostor = [0.85, 0.7, 0.5, 0.4, 0.35, 0.2, 0.1, 0.0, -0.1, -0.2]
    xb = unit(np.rad2deg(np.arccos(genuine + impostor)))
    yb = np.array([0] * 4 + [1] * 10)
    xq, yq = unit(0.0), np.array([0])  # cosine with the query at 0° = the listed score
    tars, roc = verification_metrics(xq, yq, xb, yb, fars=(0.05, 0.1, 0.25, 0.5))
    # FAR <= 0.1 allows 1 impostor: threshold 0.8 accepts 0.9, 0.8 -> TAR 2/4
    # FAR <= 0.25 allows 2: threshold 0.6 accepts 0.9, 0.8, 0.6 -> 3/4
    # FAR <= 0.5 allows 5: threshold 0.3 accepts all genuine -> 1
    assert tars[tar_name(0.1)] == pytest.approx(0.5)
    assert tars[tar_name(0.25)] == pytest.approx(0.75)
    assert tars[tar_name(0.5)] == pytest.approx(1.0)
    assert math.isnan(tars[tar_name(0.05)])  # 10 impostors cannot resolve FAR 0.05
    assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1


def test_tar_nan_when_too_few_impostors() -> None:
    x, y = perfect(n_id=2, per_id=10)  # 200 impostor pairs: 200 × 1e-3 < 1, 200 × 1e-2 = 2
    tars, _ = verification_metrics(x, y, x, y)
    assert math.isnan(tars["tar@far=1e-4"]) and math.isnan(tars["tar@far=1e-3"])
    assert tars["tar@far=1e-2"] == pytest.approx(1.0)


def test_roc_downsampled_and_impostors_subsampled_reproducibly() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 50, size=1200)
    x = rng.normal(size=(1200, 8)).astype(np.float32)
    tars, roc = verification_metrics(x, y, x, y)
    assert len(roc["fpr"]) <= 500 and np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    full = verification_metrics(x, y, x, y, fars=(1e-2,))[0]["tar@far=1e-2"]
    a = verification_metrics(x, y, x, y, fars=(1e-2,), max_pairs=200_000, seed=3)[0]["tar@far=1e-2"]
    b = verification_metrics(x, y, x, y, fars=(1e-2,), max_pairs=200_000, seed=3)[0]["tar@far=1e-2"]
    assert a == b and abs(a - full) < 0.05


def _clusters(n_q: int, n_g: int, n_id: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_id, 8)).astype(np.float32)
    yq, yb = rng.integers(0, n_id, size=n_q), rng.integers(0, n_id, size=n_g)
    xq = centres[yq] + 1.1 * rng.normal(size=(n_q, 8)).astype(np.float32)
    xb = centres[yb] + 1.1 * rng.normal(size=(n_g, 8)).astype(np.float32)
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(xq), yq, norm(xb), yb


def test_sampled_pairs_hold_every_genuine_pair_and_only_impostors_drawn_per_query() -> None:
    xq, yq, xb, yb = _clusters(300, 2_000, 40, seed=0)
    s = sample_pairs(xq, yq, xb, yb, max_pairs=60_000, seed=4)
    full = xq @ xb.T
    same = yq[:, None] == yb[None, :]
    # every genuine pair, once (a row-by-row dot product: float32 rounding differs from the matrix product's)
    assert np.allclose(np.sort(s.genuine), np.sort(full[same]), atol=1e-6)
    assert np.array_equal(np.bincount(s.genuine_query, minlength=300), same.sum(axis=1))
    assert s.per_query == (60_000 - same.sum()) // 300 and np.all(np.bincount(s.impostor_query) == s.per_query)
    assert np.all(yb[s.impostor_row] != yq[s.impostor_query])
    assert np.allclose(s.impostor, full[s.impostor_query, s.impostor_row], atol=1e-6)
    assert len(np.unique(s.impostor_row)) > 0.9 * 2_000  # spread over the gallery
    again = sample_pairs(xq, yq, xb, yb, max_pairs=60_000, seed=4)
    assert np.array_equal(again.impostor, s.impostor)  # seeded
    counts = verification_pairs(yq, yb, max_pairs=60_000)
    assert counts["sampled"] and counts["impostor"] == s.impostor.size and counts["genuine"] == s.genuine.size
    assert counts["impostor_total"] == int((~same).sum()) and "seeded sample" in counts["text"]
    assert not verification_pairs(yq, yb)["sampled"]


def test_sampled_tar_lies_between_the_exact_tars_at_far_plus_minus_four_sigma() -> None:
    """With M impostor draws the sampled threshold's true FAR has sd sqrt(f/M): the sampled TAR at f lies between
    the exhaustive TARs at f − 4·sd and f + 4·sd (the ROC is monotone), for every seed tried."""
    xq, yq, xb, yb = _clusters(400, 3_000, 60, seed=1)  # 1.2M pairs, all scored for the exact values
    f, max_pairs = 1e-2, 100_000
    m = verification_pairs(yq, yb, max_pairs)["impostor"]
    sd = math.sqrt(f / m)
    lo, hi = verification_metrics(xq, yq, xb, yb, fars=(f - 4 * sd, f + 4 * sd), max_pairs=10**8)[0].values()
    for seed in range(5):
        tar = verification_metrics(xq, yq, xb, yb, fars=(f,), max_pairs=max_pairs, seed=seed)[0][tar_name(f)]
        assert lo <= tar <= hi, (seed, lo, tar, hi)
    assert hi - lo < 0.1  # a bracket narrow enough to mean something


def test_sampled_verification_never_builds_the_query_by_gallery_matrix() -> None:
    import tracemalloc

    xq, yq, xb, yb = _clusters(200, 100_000, 500, seed=2)  # 20M pairs: 80 MB as a float32 matrix
    tracemalloc.start()
    verification_metrics(xq, yq, xb, yb, fars=(1e-3,), max_pairs=400_000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_missing_query_identity_raises_naming_it() -> None:
    xb, yb = unit([0, 90]), np.array(["alice", "bob"])
    with pytest.raises(ValueError, match="carol"):
        retrieval_metrics(unit([10, 80]), np.array(["alice", "carol"]), xb, yb)


def table(rows: dict[str, dict[str, float]]) -> CompatibilityTable:
    return CompatibilityTable(rows={tuple(k.split("/")): v for k, v in rows.items()}, rocs={})


def test_criterion_strict_per_metric_and_gate() -> None:
    t = table(
        {
            "old/old": {"top1": 0.50, "top5": 0.70, "tar@far=1e-3": 0.40},
            "new/old": {"top1": 0.55, "top5": 0.70, "tar@far=1e-3": 0.45},  # top5 tie: a fail
            "new/new": {"top1": 0.60, "top5": 0.80, "tar@far=1e-3": 0.50},
        }
    )
    c = criterion(t)
    assert c.cross == {"top1": True, "top5": False, "tar@far=1e-3": True}
    assert c.self_ == {"top1": True, "top5": True, "tar@far=1e-3": True}
    assert c.passed and c.reasons == []  # top5 fails, but it is not a gate metric
    assert c.update_gain is None and c.retention is None  # no paragon row

    c5 = criterion(t, gate_metrics=("top1", "top5"))
    assert not c5.passed
    assert c5.reasons == ["top5: new/old 0.7000 <= old/old 0.7000"]


def test_interval_gate_needs_the_lower_bound_above_zero() -> None:
    t = table({"old/old": {"top1": 0.50}, "new/old": {"top1": 0.52}, "new/new": {"top1": 0.60}})
    resolved = {"cross": {"top1": (0.02, 0.005, 0.035)}, "self": {"top1": (0.10, 0.08, 0.12)}}
    noisy = {"cross": {"top1": (0.02, -0.004, 0.044)}, "self": {"top1": (0.10, 0.08, 0.12)}}
    assert criterion(t, gate_metrics=("top1",)).passed  # the point estimates alone pass
    ok = criterion(t, gate_metrics=("top1",), intervals=resolved, require="interval", level=0.95)
    assert ok.passed and ok.to_dict()["intervals"]["cross"]["top1"] == [0.02, 0.005, 0.035]
    bad = criterion(t, gate_metrics=("top1",), intervals=noisy, require="interval", level=0.95)
    assert not bad.passed and bad.cross == {"top1": False} and bad.self_ == {"top1": True}
    assert bad.reasons == ["top1: new/old − old/old = +2.00 [-0.40, +4.40] points (95% CI): the interval reaches 0, "
                           "the gain is not resolved"]  # fmt: skip
    assert "+2.00 [-0.40, +4.40]" in bad.markdown() and "CI low > 0" in bad.markdown()
    with pytest.raises(ValueError, match="needs the intervals"):
        criterion(t, gate_metrics=("top1",), require="interval")


def test_criterion_nan_fails_with_reason() -> None:
    t = table({"old/old": {"top1": 0.5}, "new/old": {"top1": math.nan}, "new/new": {"top1": 0.6}})
    c = criterion(t, gate_metrics=("top1",))
    assert not c.passed and c.cross["top1"] is False and "NaN" in c.reasons[0]
    json.dumps(c.to_dict(), allow_nan=False)


def test_update_gain_and_retention() -> None:
    t = table(
        {
            "old/old": {"top1": 0.5, "mAP": 0.4},
            "new/old": {"top1": 0.6, "mAP": 0.3},
            "new/new": {"top1": 0.7, "mAP": 0.6},
            "paragon/paragon": {"top1": 0.8, "mAP": 0.8},
        }
    )
    c = criterion(t, gate_metrics=("top1",))
    assert c.update_gain == pytest.approx({"top1": (0.6 - 0.5) / (0.8 - 0.5), "mAP": (0.3 - 0.4) / (0.8 - 0.4)})
    assert c.retention == pytest.approx({"top1": 0.7 / 0.8, "mAP": 0.6 / 0.8})
    assert criterion(t, gate_metrics=("top1",), paragon=None).update_gain is None
    worse = table({"old/old": {"top1": 0.5, "mAP": 0.4}, "new/old": {"top1": 0.6, "mAP": 0.3},
                   "new/new": {"top1": 0.7, "mAP": 0.6}, "paragon/paragon": {"top1": 0.5, "mAP": 0.9}})  # fmt: skip
    gain = criterion(worse, gate_metrics=("top1",)).update_gain  # the paragon does not beat old/old on top1
    assert math.isnan(gain["top1"]) and gain["mAP"] == pytest.approx((0.3 - 0.4) / (0.9 - 0.4))
    with pytest.raises(ValueError, match="unknown gate metric"):
        criterion(t, gate_metrics=("top9",))


def test_compatibility_table_rotated_model_fails_compatible_one_passes() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32)).astype(np.float32)
    yq, yb = np.repeat(np.arange(40), 5), np.repeat(np.arange(40), 5)

    def model(noise: float, rotation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = centres[yq] + noise * rng.normal(size=(len(yq), 32)).astype(np.float32)
        g = centres[yb] + noise * rng.normal(size=(len(yb), 32)).astype(np.float32)
        return (q, g) if rotation is None else (q @ rotation, g @ rotation)

    rotation = np.linalg.qr(rng.normal(size=(32, 32)))[0].astype(np.float32)
    features = {"old": model(1.2), "new": model(0.6), "paragon": model(0.6, rotation)}
    pairs = [("old", "old"), ("new", "old"), ("new", "new"), ("paragon", "old"), ("paragon", "paragon")]
    t = compatibility_table(features, yq, yb, pairs)
    assert criterion(t).passed  # default gate: top1 and tar@far=1e-3 (39,800 impostor pairs resolve it)
    bad = criterion(t, new="paragon")
    assert not bad.passed and not bad.cross["top1"] and bad.self_["top1"]
    assert set(t.rocs) == set(t.rows)

    md = t.markdown(criterion(t))
    labels = [line[0] for line in content(md) if isinstance(line, list)]
    for p in pairs:
        assert pair_name(*p) in labels
    for m in METRICS:
        assert m in md
    assert "✓" in md and "update gain" in md and "retention" in md
    d = t.to_dict()
    assert set(d) == {pair_name(*p) for p in pairs}
    json.dumps(d, allow_nan=False)
    assert t.rich_table(bad).row_count == len(pairs) + 5


# `table.md` (`mixbct table`, the README's expected result) as the string-building renderer wrote it before
# DataFrame.to_markdown: same lines, cells and column alignment; tabulate pads the cells, which `content` ignores.
TABLE_MD_BEFORE = """\
| query/gallery | top1 | top5 | mAP | tar@far=1e-3 |
|---|---:|---:|---:|---:|
| old/old | 0.5000 | 0.7000 | 0.5500 | 0.4000 |
| new/old | 0.6000 | 0.8000 | 0.6500 | 0.3500 |
| new/new | 0.8000 | 0.9000 | 0.8500 | NaN |
| paragon/paragon | 0.9000 | 0.9500 | 0.9000 | 0.7000 |
| paragon/old | 0.0010 | 0.0040 | 0.0100 |  |

| verdict | top1 | top5 | mAP | tar@far=1e-3 |
|---|:---:|:---:|:---:|:---:|
| gate | ● |  |  | ● |
| cross: new/old > old/old | ✓ | ✓ | ✓ | ✗ |
| self: new/new > old/old | ✓ | ✓ | ✓ | ✗ |
| update gain (vs paragon/paragon) | 0.2500 | 0.4000 | 0.2857 | -0.1667 |
| retention new/new ÷ paragon/paragon | 0.8889 | 0.9474 | 0.9444 | NaN |

**Compatibility gate (top1, tar@far=1e-3): FAILED**
- tar@far=1e-3: new/old 0.3500 <= old/old 0.4000
- tar@far=1e-3: new/new NaN vs old/old 0.4000 (NaN: not measurable)
"""


def test_table_markdown_content_is_what_the_string_building_renderer_wrote() -> None:
    t = CompatibilityTable.from_dict({
        "old/old": {"top1": 0.5, "top5": 0.7, "mAP": 0.55, "tar@far=1e-3": 0.4},
        "new/old": {"top1": 0.6, "top5": 0.8, "mAP": 0.65, "tar@far=1e-3": 0.35},
        "new/new": {"top1": 0.8, "top5": 0.9, "mAP": 0.85, "tar@far=1e-3": None},  # NaN: not measurable
        "paragon/paragon": {"top1": 0.9, "top5": 0.95, "mAP": 0.9, "tar@far=1e-3": 0.7},
        "paragon/old": {"top1": 0.001, "top5": 0.004, "mAP": 0.01},  # no TAR: an empty cell
    })  # fmt: skip
    md = t.markdown(criterion(t))
    assert content(md) == content(TABLE_MD_BEFORE)
    header, align, *_ = md.splitlines()
    assert len(header) == len(align) and align.startswith("|:---") and align.endswith("--:|")  # padded, right-aligned
    assert content(t.markdown()) == content(TABLE_MD_BEFORE.split("\n\n")[0])


def test_compatibility_table_unknown_model() -> None:
    x, y = perfect(n_id=2, per_id=2)
    with pytest.raises(ValueError, match="newer"):
        compatibility_table({"old": (x, x)}, y, y, [("newer", "old")])
