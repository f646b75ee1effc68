"""Approximate gallery indexes (components.ann): built from a factory string, measured against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from components.ann import build_index, compare_with_exact, is_exact, recall_at_1, timed_search


def _clustered(n: int, d: int, centres: int, seed: int) -> np.ndarray:
    """Unit vectors around `centres` directions: the structure real embeddings have (random data misleads ANN)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_is_exact_search() -> None:
    xb, xq = _clustered(3_000, 16, 50, 0), _clustered(200, 16, 50, 1)
    _, rows, seconds = timed_search(build_index(xb), xq, 5)
    want = np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :5]
    assert (rows[:, 0] == want[:, 0]).mean() == 1.0 and seconds > 0
    assert is_exact("Flat") and not is_exact("IVF64,Flat")


def test_ivf_recall_grows_with_nprobe_and_reaches_one_when_every_list_is_probed() -> None:
    xb, xq = _clustered(20_000, 32, 200, 2), _clustered(500, 32, 200, 3)
    recalls = []
    for nprobe in (1, 8, 64):
        index = build_index(xb, "IVF64,Flat", f"nprobe={nprobe}")
        recalls.append(compare_with_exact(index, xq, xb, "IVF64,Flat", f"nprobe={nprobe}").recall_at_1)
    assert recalls[0] < recalls[1] <= recalls[2] == 1.0, recalls
    hnsw = [compare_with_exact(build_index(xb, "HNSW16", f"efSearch={ef}"), xq, xb, "HNSW16") for ef in (16, 1024)]
    assert hnsw[0].recall_at_1 < hnsw[1].recall_at_1 and hnsw[1].recall_at_1 > 0.99  # efSearch buys recall
    report = hnsw[0]
    assert report.qps > 0 and report.exact_qps > 0 and report.speedup == report.qps / report.exact_qps
    assert set(report.as_metrics()) == {"index.recall@1", "index.qps", "exact.qps"}


def test_training_uses_a_seeded_sample_so_the_same_gallery_gives_the_same_index() -> None:
    xb, xq = _clustered(5_000, 16, 40, 4), _clustered(300, 16, 40, 5)
    a = timed_search(build_index(xb, "IVF32,Flat", "nprobe=2", train_rows=2_000, seed=7), xq, 3)[1]
    b = timed_search(build_index(xb, "IVF32,Flat", "nprobe=2", train_rows=2_000, seed=7), xq, 3)[1]
    assert np.array_equal(a, b)


def test_a_tie_with_the_exact_top_score_counts_as_found() -> None:
    exact_rows, approx_rows = np.array([[3], [5]]), np.array([[4], [6]])
    exact_s, approx_s = np.array([[0.9], [0.8]], np.float32), np.array([[0.9], [0.7]], np.float32)
    assert recall_at_1(approx_rows, exact_rows) == 0.0
    assert recall_at_1(approx_rows, exact_rows, approx_s, exact_s) == 0.5


def test_bad_factory_strings_and_params_are_refused_naming_the_setting() -> None:
    xb = _clustered(500, 8, 10, 6)
    with pytest.raises(ValueError, match=r"evaluate.index: 'IVFx' is not a faiss index factory string"):
        build_index(xb, "IVFx")
    with pytest.raises(ValueError, match=r"evaluate.index: 'IVF4096,Flat' cannot be trained on 500 gallery rows"):
        build_index(xb, "IVF4096,Flat")
    with pytest.raises(ValueError, match=r"evaluate.index_params: 'nprobe=4' does not apply to 'HNSW8'"):
        build_index(xb, "HNSW8", "nprobe=4")


def test_a_gallery_too_small_for_the_index_is_searched_exactly_by_the_evaluation() -> None:
    from components.ann import GalleryTooSmall
    from components.evaluate import retrieval_metrics, set_index

    xb, xq = _clustered(30, 8, 30, 7), _clustered(60, 8, 30, 8)
    yb, yq = np.arange(30), np.arange(60) % 30
    with pytest.raises(GalleryTooSmall):
        build_index(xb, "IVF64,Flat")
    exact = retrieval_metrics(xq, yq, xb, yb)
    set_index("IVF64,Flat", "nprobe=1")
    try:
        assert retrieval_metrics(xq, yq, xb, yb) == exact
    finally:
        set_index()



def test_search_settings_change_on_a_built_index_as_if_it_were_built_with_them() -> None:
    """The benchmark builds each factory once and sweeps its knobs: the same answers as an index built per knob."""
    from components.ann import set_search_params

    xb, xq = _clustered(4_000, 16, 40, 9), _clustered(100, 16, 40, 10)
    index = build_index(xb, "HNSW16")
    for ef in (16, 256):
        set_search_params(index, "HNSW16", f"efSearch={ef}")
        swept = timed_search(index, xq, 5)[:2]
        built = timed_search(build_index(xb, "HNSW16", f"efSearch={ef}"), xq, 5)[:2]
        assert all(np.array_equal(a, b) for a, b in zip(swept, built, strict=True))
