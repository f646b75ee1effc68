"""Figures for reviewers: ROC curves per model pair and training curves per model (PNG, matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.io import atomic_path


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
