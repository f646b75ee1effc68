"""MixBCT's denoising of old features (Liang et al., arXiv:2308.06948; method.md "MixBCT, exactly").

Rows are L2-normalised, then each dimension is L2-normalised across all samples (columns). In that space each
class keeps the ceil(T·n_c) samples closest to its mean as *credible*; T = 0.9 is a keep ratio, not a
distance, so classes with ≤ 9 samples keep everything.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _row_normalised(block: np.ndarray) -> np.ndarray:
    x = np.array(block, dtype=np.float64)  # a copy, in float64
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def column_norms(features: Any, block: int = 65_536) -> np.ndarray:
    """L2 norms [d] of the columns of the row-normalised features, read `block` rows at a time. The sum of squares
    runs down the rows in order, exactly as `np.linalg.norm(x, axis=0)` adds them, so the result is the same to the
    last bit whatever the block."""
    acc: np.ndarray | None = None
    for start in range(0, len(features), block):
        sq = _row_normalised(features[start : start + block]) ** 2
        acc = np.add.reduce(sq if acc is None else np.concatenate([acc[None], sq]), axis=0)
    if acc is None:
        raise ValueError("no features")
    return np.sqrt(acc)


def denoise_space(features: np.ndarray) -> np.ndarray:
    """Row-L2 then column-L2 normalisation of old features [N, d] (float64 for a stable ranking)."""
    x = _row_normalised(features)
    x /= np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-12)  # columns
    return x


def keep_count(n: int, keep: float) -> int:
    """ceil(keep·n), robust to float noise (0.9·70 = 63.000000000000007 must keep 63, not 64)."""
    return min(n, math.ceil(round(keep * n, 9)))


def credible_mask(features: Any, labels: np.ndarray, keep: float = 0.9, block: int = 65_536) -> np.ndarray:
    """Bool [N]: True for the ceil(keep·n_c) samples of each class closest to their class mean.

    `features` is an array [N, d] or a lazy row view (components.data.store.ArrayRows): it is read a block of rows
    at a time for the column norms, then one class at a time, so a million-row training set never sits in memory in
    float64. The mask equals the one computed on the whole array at once."""
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2 or len(features) != len(labels):
        raise ValueError(f"features {shape} and labels {np.shape(labels)} do not match")
    cols = np.maximum(column_norms(features, block)[None, :], 1e-12)
    mask = np.zeros(len(labels), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for idx in np.split(order, bounds):
        if idx.size == 0:
            continue
        x = _row_normalised(features[idx])
        x /= cols
        centre = x.mean(axis=0)
        dist = np.linalg.norm(x - centre, axis=1)
        closest = np.argsort(dist, kind="stable")[: keep_count(idx.size, keep)]
        mask[idx[closest]] = True
    return mask
