"""MixBCT's denoising of old features (Liang et al., arXiv:2308.06948; method.md "MixBCT, exactly").

Rows are L2-normalised, then each dimension is L2-normalised across all samples (columns). In that space each
class keeps the ceil(T·n_c) samples closest to its mean as *credible*; T = 0.9 is a keep ratio, not a
distance, so classes with ≤ 9 samples keep everything.
"""

from __future__ import annotations

import math

import numpy as np


def denoise_space(features: np.ndarray) -> np.ndarray:
    """Row-L2 then column-L2 normalisation of old features [N, d] (float64 for a stable ranking)."""
    x = features.astype(np.float64, copy=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # rows
    x /= np.maximum(np.linalg.norm(x, axis=0, keepdims=True), 1e-12)  # columns
    return x


def keep_count(n: int, keep: float) -> int:
    """ceil(keep·n), robust to float noise (0.9·70 = 63.000000000000007 must keep 63, not 64)."""
    return min(n, math.ceil(round(keep * n, 9)))


def credible_mask(features: np.ndarray, labels: np.ndarray, keep: float = 0.9) -> np.ndarray:
    """Bool [N]: True for the ceil(keep·n_c) samples of each class closest to their class mean."""
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    x = denoise_space(features)
    mask = np.zeros(len(labels), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for idx in np.split(order, bounds):
        if idx.size == 0:
            continue
        centre = x[idx].mean(axis=0)
        dist = np.linalg.norm(x[idx] - centre, axis=1)
        closest = np.argsort(dist, kind="stable")[: keep_count(idx.size, keep)]
        mask[idx[closest]] = True
    return mask
