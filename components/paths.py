"""Where each stage reads and writes, under one work folder (`artifacts/` for DVC, run-scoped for flows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# Every name the upgrade writes directly under its work folder (what `io.claim_workdir` accepts as its own).
# `benchmark` is the grids' default folder (artifacts/benchmark); `.gitignore` what DVC may write beside outputs.
LAYOUT = frozenset({
    "dataset", "legacy", "old_features", "new", "paragon", "eval", "reports", "checkpoints", "registration.json",
    "benchmark", ".gitignore",
})  # fmt: skip
# ... and under a benchmark grid's folder.
BENCHMARK_LAYOUT = frozenset({"cells", "shared"})


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def manifest(self) -> Path:
        return self.dataset / "manifest.csv"

    @property
    def images(self) -> Path:
        return self.dataset / "images.npy"

    @property
    def legacy(self) -> Path:
        return self.root / "legacy"

    @property
    def old_features(self) -> Path:
        return self.root / "old_features"

    def model_dir(self, role: str) -> Path:
        """role: "new" (the compatible model) or "paragon"."""
        return self.root / role

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def registration(self) -> Path:
        return self.root / "registration.json"
