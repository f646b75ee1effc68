"""MixBCT's denoising: the credible mask on hand-made examples."""

from __future__ import annotations

import numpy as np

from components.credible import credible_mask, keep_count


def test_keep_count_is_ceil_and_float_safe() -> None:
    assert keep_count(9, 0.9) == 9  # classes with <= 9 samples keep all
    assert keep_count(10, 0.9) == 9
    assert keep_count(20, 0.9) == 18
    assert keep_count(70, 0.9) == 63  # 0.9 * 70 = 63.000000000000007 in floating point
    assert keep_count(11, 0.9) == 10  # ceil(9.9)


def test_outlier_of_each_class_is_dropped() -> None:
    rng = np.random.default_rng(0)
    # class 0 points along +x, class 1 along +y; one outlier each, pointing elsewhere.
    c0 = np.array([1.0, 0.0, 0.0]) + 0.01 * rng.standard_normal((10, 3))
    c1 = np.array([0.0, 1.0, 0.0]) + 0.01 * rng.standard_normal((10, 3))
    c0[4] = [0.0, 0.0, 1.0]
    c1[7] = [-1.0, 0.0, 0.0]
    feats = np.concatenate([c0, c1])
    labels = np.array([0] * 10 + [1] * 10)
    mask = credible_mask(feats, labels, keep=0.9)
    assert mask.sum() == 18
    assert not mask[4] and not mask[10 + 7]


def test_small_classes_keep_everything_and_order_does_not_matter() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((9 + 12, 4))
    labels = np.array([3] * 9 + [1] * 12)
    mask = credible_mask(feats, labels, keep=0.9)
    assert mask[:9].all() and mask[9:].sum() == 11
    perm = rng.permutation(len(labels))
    assert np.array_equal(credible_mask(feats[perm], labels[perm], keep=0.9), mask[perm])


def test_scale_of_rows_does_not_change_the_mask() -> None:
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((30, 5))
    labels = np.repeat([0, 1, 2], 10)
    scaled = feats * rng.uniform(0.1, 10.0, size=(30, 1))  # rows are L2-normalised first
    assert np.array_equal(credible_mask(feats, labels), credible_mask(scaled, labels))


def test_mask_read_by_blocks_from_a_file_equals_the_mask_of_the_whole_array(tmp_path) -> None:
    """The extract stage never holds the old features whole: it reads them back by rows. Same mask, bit for bit."""
    from components.credible import column_norms
    from components.data.store import ArrayRows

    rng = np.random.default_rng(3)
    feats = rng.standard_normal((2_000, 16)).astype(np.float32) * rng.uniform(0.1, 10, (2_000, 1)).astype(np.float32)
    labels = rng.integers(0, 37, 2_000)
    np.save(tmp_path / "f.npy", feats)
    rows = ArrayRows(tmp_path / "f.npy")
    assert np.array_equal(column_norms(rows, block=77), np.linalg.norm(_row_normed(feats), axis=0))
    assert np.array_equal(credible_mask(rows, labels, keep=0.9, block=77), credible_mask(feats, labels, keep=0.9))


def _row_normed(feats: np.ndarray) -> np.ndarray:
    x = feats.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
