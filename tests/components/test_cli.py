"""The user-facing commands: evaluate two models on ImageFolder trees, print the last table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from components.embed import export_onnx, save_backbone
from components.models import build_backbone
from flows.cli import app

runner = CliRunner()


def _folder(root: Path, identities: int, per: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(identities):
        (root / f"person{i}").mkdir(parents=True)
        for j in range(per):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"person{i}" / f"{j}.png")
    return root


def test_evaluate_two_models_on_imagefolders(tmp_path: Path) -> None:
    old, new = build_backbone("small_cnn", 16, 32).eval(), build_backbone("resnet_small", 16, 32).eval()
    export_onnx(old, tmp_path / "old.onnx", 32)
    save_backbone(new, tmp_path / "new.pt", "resnet_small", 16, 32)  # torch and ONNX mix freely
    q, g = _folder(tmp_path / "q", 5, 2, 0), _folder(tmp_path / "g", 5, 1, 1)
    result = runner.invoke(app, ["evaluate", "--query-model", str(tmp_path / "new.pt"), "--gallery-model",
                                 str(tmp_path / "old.onnx"), "--query-dir", str(q), "--gallery-dir", str(g)])  # fmt: skip
    assert result.exit_code == 0, result.output
    for pair in ("old/old", "new/old", "new/new"):
        assert pair in result.output


def test_evaluate_refuses_different_dimensions(tmp_path: Path) -> None:
    export_onnx(build_backbone("small_cnn", 16, 32), tmp_path / "a.onnx", 32)
    export_onnx(build_backbone("small_cnn", 8, 32), tmp_path / "b.onnx", 32)
    q = _folder(tmp_path / "q", 3, 1, 0)
    result = runner.invoke(app, ["evaluate", "--query-model", str(tmp_path / "a.onnx"), "--gallery-model",
                                 str(tmp_path / "b.onnx"), "--query-dir", str(q), "--gallery-dir", str(q)])  # fmt: skip
    assert result.exit_code == 1 and "16-d" in result.output and "8-d" in result.output


def test_table_without_evaluation_says_what_to_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["table", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "mixbct upgrade" in result.output


def test_env_sh_exports_the_offline_environment() -> None:
    """README walkthroughs `source env.sh`: it must set exactly what the CLI and the tests set."""
    import re
    from pathlib import Path

    from flows.cli import OFFLINE_ENV

    text = (Path(__file__).resolve().parents[2] / "env.sh").read_text()
    exported = dict(re.findall(r"^export (\w+)=(\S+)$", text, flags=re.M))
    assert exported.pop("PREFECT_HOME") == '"${PREFECT_HOME:-$PWD/.prefect}"'
    assert exported == OFFLINE_ENV
