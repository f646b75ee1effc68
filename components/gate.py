"""The registration decision, in one place: register the new model only if it is compatible and its ONNX export
computes what the trained torch model computes.

Pure: it reads the criterion verdict as `evaluate` stored it (eval/metrics.json, `Criterion.to_dict()`) and the
measured ONNX parity; it imports neither MLflow nor torch. `stages.register` measures, `registry` records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Decision:
    """Whether to register, why not, and the verdict as MLflow tags (set on the run and on the version)."""

    register: bool
    reasons: list[str]  # one line per failed check, with the numbers; empty when `register`
    compatible: bool  # the criterion passed (tag `gate.passed`, which `promote` requires)
    onnx_parity: float | None  # max |torch − onnxruntime| of the new model; None when not measured
    onnx_ok: bool  # the parity was measured and is within tolerance
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The reasons as one line (tag `registration.reason`)."""
        return "; ".join(self.reasons)


def decide(criterion: dict[str, Any], onnx_parity: float | None, tolerance: float) -> Decision:
    """Register only when the compatibility criterion passed and the ONNX export agrees with torch within
    `tolerance` (params: evaluate.onnx_tolerance). A parity that is missing or not finite refuses too: the file
    that would be registered was never checked."""
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    reasons: list[str] = []
    compatible = bool(criterion["passed"])
    if not compatible:
        reasons += list(criterion.get("reasons") or ["compatibility criterion failed"])
    if onnx_parity is None:
        onnx_ok = False
        reasons.append("ONNX parity not measured")
    else:
        onnx_ok = math.isfinite(onnx_parity) and onnx_parity <= tolerance
        if not onnx_ok:
            reasons.append(f"ONNX parity {onnx_parity:.2e} > {tolerance:g} (max |torch - onnxruntime|)")
    tags = {f"gate.{m}": str(ok) for m, ok in criterion.get("cross", {}).items()}  # registry makes them MLflow-safe
    tags.update({f"self.{m}": str(ok) for m, ok in criterion.get("self", {}).items()})
    tags["gate.passed"] = str(compatible)
    tags["gate.onnx_ok"] = str(onnx_ok)
    return Decision(register=compatible and onnx_ok, reasons=reasons, compatible=compatible,
                    onnx_parity=onnx_parity, onnx_ok=onnx_ok, tags=tags)  # fmt: skip
