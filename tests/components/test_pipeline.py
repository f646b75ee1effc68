"""The stage table is the one definition of the pipeline: dvc.yaml agrees with it, keys say what each model
depends on, and every stage function has the table's runner as its only caller."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from components import keys, pipeline
from components.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_dvc_yaml_is_generated_from_the_stage_table() -> None:
    assert (ROOT / "dvc.yaml").read_text() == pipeline.dvc_yaml(), "dvc.yaml is stale: run `mixbct dvc-yaml`"


def test_every_stage_depends_on_the_code_it_runs() -> None:
    deps = {s.name: set(pipeline.code_deps(s)) for s in pipeline.STAGES}
    for name, files in deps.items():
        assert {"components/stages.py", "components/config.py", "components/pipeline.py"} <= files, name
    assert "components/data/kanjivg.py" in deps["prepare"]  # reached through manifest's lazy import
    assert "components/credible.py" in deps["extract"] and "components/credible.py" not in deps["train"]
    assert "components/losses/mixbct.py" in deps["train"] and "components/losses/mixbct.py" not in deps["evaluate"]
    assert "components/evaluate.py" in deps["evaluate"] and "components/plots.py" in deps["evaluate"]
    assert "components/registry.py" in deps["register"] and "components/registry.py" not in deps["train"]


def test_each_stage_function_has_one_caller_the_table() -> None:
    """grep, as the issue asks: outside components/stages.py, only components/pipeline.py calls a stage function."""
    called = {c for s in pipeline.STAGES for c in s.calls} - {"input_hashes", "fingerprint"}
    callers: dict[str, list[str]] = {name: [] for name in called}
    for path in [*ROOT.glob("components/**/*.py"), *ROOT.glob("flows/*.py"), *ROOT.glob("benchmarks/*.py")]:
        if path.name == "stages.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr in callers):
                continue
            owner = node.value.func if isinstance(node.value, ast.Call) else node.value  # stages.x or _stages().x
            if isinstance(owner, ast.Name) and owner.id in ("stages", "_stages"):
                callers[node.attr].append(path.relative_to(ROOT).as_posix())
    assert all(set(who) == {"components/pipeline.py"} for who in callers.values()), callers


def test_paragon_key_ignores_the_compatibility_method_and_runtime() -> None:
    base = load_config(None)
    other = load_config(None, {"train.method": "l2", "runtime.threads": 1, "train.paragon": False})
    for cfg in (base, other):
        assert not keys.METHOD_FIELDS & set(keys.train_recipe(cfg.train, "paragon"))
    assert keys.shared(base)["paragon"] == keys.shared(other)["paragon"]  # the benchmark shares it
    assert keys.shared(base)["new"] != keys.shared(other)["new"]
    ck = [keys.model_checkpoint(c.train, "paragon", 32, "m" * 64, None) for c in (base, other)]
    assert ck[0] == ck[1]  # the flow and `mixbct stage paragon` resume it
    assert keys.params_digest(base) == keys.params_digest(load_config(None, {"runtime.threads": 1}))
    dvc = pipeline.dvc_stages()
    assert "train.method" not in dvc["paragon"]["params"] and "train.method" in dvc["train"]["params"]


def test_a_new_method_reuses_the_trained_paragon(params_factory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The flow's path: `pipeline.run("paragon")` after a method change finds the finished checkpoint."""
    from components.paths import Paths

    params = params_factory()
    paths = Paths(tmp_path / "work")
    cfg = load_config(params)
    pipeline.run("prepare", cfg, paths)
    pipeline.run("paragon", cfg, paths)
    checkpoints = sorted(p.name for p in (paths.root / "checkpoints").iterdir())
    with caplog.at_level(logging.INFO, logger="components.train"):
        pipeline.run("paragon", load_config(params, {"train.method": "l2"}), paths)
    assert sorted(p.name for p in (paths.root / "checkpoints").iterdir()) == checkpoints
    assert f"{cfg.train.epochs} of {cfg.train.epochs} epochs done" in caplog.text
