"""Devices and precision (components/device.py): resolution on this machine, bf16 autocast and channels_last on the
CPU, and checkpoints that resume across precisions. What only a GPU can show (CUDA speed, fp16 with the scaler, a
GPU-trained model's ONNX parity) is listed in the README, not faked here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.device import current_placement, place
from components.errors import ConfigError
from components.losses import build_method
from components.models import build_backbone
from components.task import CompatibleTask
from components.train import LoopConfig, fit

from train_kit import toy_arrays


def _task(d: int = 8) -> tuple[CompatibleTask, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", d, 16)
    return CompatibleTask(backbone, build_method("mixbct", embedding_dim=d, num_classes=4, args={"alpha": 0.3})), backbone


def test_auto_resolves_to_this_machine_and_impossible_requests_name_the_setting() -> None:
    auto = place()
    if torch.cuda.is_available():
        assert auto.device.type == "cuda" and auto.precision in ("bf16", "fp16") and auto.channels_last
    else:
        assert (auto.device.type, auto.precision, auto.channels_last) == ("cpu", "fp32", False)
        with pytest.raises(ConfigError, match="runtime.device: cuda asked for"):
            place("cuda")
    with pytest.raises(ConfigError, match="runtime.precision: fp16 needs a CUDA device"):
        place("cpu", "fp16")
    assert place("cpu", "bf16").autocast_dtype is torch.bfloat16 and not place("cpu", "bf16").scaler().is_enabled()
    assert current_placement().device.type == "cpu"


def test_bf16_autocast_trains_and_its_checkpoint_resumes_in_fp32(tmp_path: Path) -> None:
    cfg = LoopConfig(epochs=3, batch_size=16, lr=0.05, seed=1)
    task, backbone = _task()

    class Stop(Exception):
        pass

    def stop(record: dict) -> None:
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(task, backbone, toy_arrays(), cfg, tmp_path / "ck.pt", on_epoch=stop, placement=place("cpu", "bf16"))
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    floats = [t for t in state["task"].values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)  # weights stay fp32 under autocast
    resumed, rb = _task()
    history = fit(resumed, rb, toy_arrays(), cfg, tmp_path / "ck.pt", placement=place("cpu", "fp32"))
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]


def test_channels_last_gives_the_same_training_to_float_rounding(tmp_path: Path) -> None:
    cfg = LoopConfig(epochs=1, batch_size=16, lr=0.05, seed=2)
    runs = []
    for channels_last in (False, True):
        task, backbone = _task()
        fit(task, backbone, toy_arrays(), cfg, tmp_path / f"ck{channels_last}.pt", placement=place("cpu", "fp32", channels_last))
        runs.append(task)
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), name
            assert b.is_contiguous(), name  # back in the usual format for export


@pytest.mark.slow
def test_compiled_training_matches_eager_and_hands_back_a_plain_module(tmp_path: Path) -> None:
    """runtime.compile: torch.compile (inductor) during fit only; the same losses to float rounding, the same
    state_dict keys (checkpoints and exports are the plain module's), an eager module afterwards."""
    cfg = LoopConfig(epochs=2, batch_size=16, lr=0.05, seed=1)
    eager_task, eager_bb = _task()
    eager = fit(eager_task, eager_bb, toy_arrays(), cfg, tmp_path / "eager.pt", placement=place("cpu", "fp32", False))
    task, backbone = _task()
    compiled = fit(task, backbone, toy_arrays(), cfg, tmp_path / "compiled.pt",
                   placement=place("cpu", "fp32", False, compile=True))  # fmt: skip
    assert np.allclose([h["loss"] for h in compiled], [h["loss"] for h in eager], rtol=1e-3)
    assert task.state_dict().keys() == eager_task.state_dict().keys()
    assert backbone._compiled_call_impl is None
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(backbone.eval()(x), eager_bb.eval()(x), atol=1e-3)
