"""The registration decision (components.gate): compatible AND an ONNX export that agrees with torch."""

from __future__ import annotations

import math

import pytest

from components.gate import decide

PASSED = {
    "passed": True, "reasons": [], "gate_metrics": ["top1"],
    "cross": {"top1": True, "tar@far=1e-3": True}, "self": {"top1": True, "tar@far=1e-3": False},
}  # fmt: skip
FAILED = {**PASSED, "passed": False, "cross": {"top1": False}, "reasons": ["top1: new/old 0.4100 <= old/old 0.5000"]}


def test_accepts_a_compatible_model_whose_onnx_agrees() -> None:
    d = decide(PASSED, 2e-7, 1e-4)
    assert d.register and d.reasons == [] and d.reason == ""
    assert d.compatible and d.onnx_ok and d.onnx_parity == 2e-7
    assert d.tags == {"gate.top1": "True", "gate.tar@far=1e-3": "True", "self.top1": "True",
                      "self.tar@far=1e-3": "False", "gate.passed": "True", "gate.onnx_ok": "True"}  # fmt: skip


def test_refuses_a_failed_criterion_with_its_reasons() -> None:
    d = decide(FAILED, 0.0, 1e-4)
    assert not d.register and not d.compatible and d.onnx_ok
    assert d.reasons == ["top1: new/old 0.4100 <= old/old 0.5000"]
    assert d.tags["gate.passed"] == "False" and d.tags["gate.top1"] == "False"


def test_refuses_a_failed_criterion_even_without_reasons() -> None:
    d = decide({**FAILED, "reasons": []}, 0.0, 1e-4)
    assert not d.register and d.reasons == ["compatibility criterion failed"]


def test_refuses_parity_above_tolerance() -> None:
    d = decide(PASSED, 3e-3, 1e-4)
    assert not d.register and d.compatible and not d.onnx_ok
    assert d.reasons == ["ONNX parity 3.00e-03 > 0.0001 (max |torch - onnxruntime|)"]
    assert d.tags["gate.passed"] == "True" and d.tags["gate.onnx_ok"] == "False"
    assert decide(PASSED, 1e-4, 1e-4).register  # the tolerance itself is allowed


def test_both_failures_give_both_reasons() -> None:
    d = decide(FAILED, 1.0, 1e-4)
    assert not d.register and len(d.reasons) == 2 and d.reason.count(";") == 1


@pytest.mark.parametrize("parity", [None, math.nan, math.inf])
def test_refuses_a_parity_that_was_not_measured(parity: float | None) -> None:
    d = decide(PASSED, parity, 1e-4)
    assert not d.register and not d.onnx_ok and d.reasons


def test_tolerance_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        decide(PASSED, 0.0, 0.0)
