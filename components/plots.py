"""Figures for reviewers: ROC curves per model pair, training curves per model and partial-backfill curves
(PNG, matplotlib Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.io import atomic_path

if TYPE_CHECKING:
    from components.stats import BackfillCurve


def _figure():  # imported lazily: matplotlib costs ~0.5 s
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_png(rocs: dict[tuple[str, str], dict[str, np.ndarray]], path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (q, g), roc in rocs.items():
        fpr = np.maximum(np.asarray(roc["fpr"]), 1e-6)
        ax.plot(fpr, roc["tpr"], label=f"{q}/{g}", linestyle="-" if q == g else "--")
    ax.set_xscale("log")
    ax.set_xlim(1e-5, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("Verification ROC per query/gallery model pair")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def training_png(histories: dict[str, Path], path: Path) -> Path:
    """Loss per epoch of each model whose history.json exists."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for role, file in histories.items():
        if file.is_file():
            history = json.loads(file.read_text())
            ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o", label=role)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def backfill_png(
    curves: BackfillCurve | Sequence[BackfillCurve] | Mapping[str, BackfillCurve],
    old_old: Mapping[str, float],
    path: Path,
) -> Path:
    """One panel per metric of the curves (top-1, TAR@FAR): M(β) for each backfill order, old/old as a horizontal
    line (the level the curve must not dip under), the order's AUC in the legend."""
    if isinstance(curves, Mapping):
        curves = list(curves.values())
    elif not isinstance(curves, Sequence):
        curves = [curves]
    metrics = list(dict.fromkeys(m for c in curves for m in c.values))
    plt = _figure()
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(5.5 * max(len(metrics), 1), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for curve in curves:
            if metric in curve.values:
                label = f"{curve.order} (AUC {curve.auc[metric]:.3f})"
                ax.plot(curve.betas, curve.values[metric], marker="o", markersize=3, label=label)
        level = old_old.get(metric)
        if level is not None and not math.isnan(level):
            ax.axhline(level, color="black", linestyle="--", linewidth=1, label=f"old/old ({level:.3f})")
        ax.set_xlim(0, 1)
        ax.set_xlabel("β: share of gallery rows re-embedded by the new model")
        ax.set_ylabel(metric)
        ax.set_title(f"Partial backfill: {metric}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
