"""The hand-written ArcFace every loss test compares against (importable: tests/components is on sys.path)."""

from __future__ import annotations

import math

import numpy as np


def reference_arcface(f: np.ndarray, w: np.ndarray, y: np.ndarray, s: float, m: float) -> float:
    """Loop-by-loop ArcFace (no easy margin), written from the formula, not from the implementation."""
    losses = []
    for i in range(len(f)):
        fi = f[i] / np.linalg.norm(f[i])
        logits = []
        for c in range(len(w)):
            cos = float(np.dot(fi, w[c] / np.linalg.norm(w[c])))
            if c == y[i]:
                theta = math.acos(cos)
                cos = math.cos(theta + m) if theta + m < math.pi else cos - math.sin(math.pi - m) * m
            logits.append(s * cos)
        logits = np.array(logits)
        losses.append(-logits[y[i]] + math.log(np.exp(logits - logits.max()).sum()) + logits.max())
    return float(np.mean(losses))
