"""A learnable toy training set for the loop's tests: a bright bar per class, old features offset by the label."""

from __future__ import annotations

import numpy as np

from components.train import TrainArrays


def toy_arrays(n: int = 96, classes: int = 4, d: int = 8) -> TrainArrays:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), n // classes)
    images = rng.integers(0, 40, size=(n, 16, 16), dtype=np.uint8)
    for c in range(classes):  # a bright bar per class: learnable
        images[labels == c, 4 * c : 4 * c + 4, 2:14] = 250
    old = rng.standard_normal((n, d)).astype(np.float32) + labels[:, None]
    return TrainArrays(images, labels, old, np.ones(n, dtype=bool))
