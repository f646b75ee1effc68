"""`dvc repro` on a tiny copy of the project: runs every stage once, then does no work, then only what changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from project_copy import copy_project, run


@pytest.mark.slow
def test_repro_is_incremental(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")

    first = run(["dvc", "repro"], project)
    for stage in ("prepare", "legacy", "extract", "train", "paragon", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first, stage
    assert (project / "artifacts/eval/metrics.json").is_file()
    second = run(["dvc", "repro"], project)
    assert "Running stage" not in second

    metrics = run(["dvc", "metrics", "show", "--json"], project)
    assert "new/old" in metrics

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["gate_metrics"] = ["top5"]  # downstream of evaluate only
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], project)
    ran = {line.split("'")[1] for line in third.splitlines() if line.startswith("Running stage")}
    assert ran == {"evaluate", "register"}, third

    # Editing the body of a function a stage runs (here one that changes what it computes): `dvc status` names
    # that stage, and `dvc repro` re-runs it and exactly the stages downstream of its output, never the others.
    credible = project / "components/credible.py"
    text = credible.read_text()
    kept = "\n    return mask\n"  # the end of credible_mask
    assert text.count(kept) == 1
    credible.write_text(text.replace(kept, "\n    mask[0] = not mask[0]  # an edit\n    return mask\n"))
    out = run(["dvc", "status", "--json"], project)
    status = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert set(status) == {"extract"} and "components/credible.py" in json.dumps(status["extract"]), status
    edited = run(["dvc", "repro"], project)
    ran = {line.split("'")[1] for line in edited.splitlines() if line.startswith("Running stage")}
    assert ran == {"extract", "train", "evaluate", "register"}, edited
    credible.write_text(text)
    run(["dvc", "repro"], project)  # back to the committed code (from DVC's run cache)

    # An experiment with another method: only the new model and what follows it run again (never the paragon).
    exp = run(["dvc", "exp", "run", "-S", "train.method=l2"], project)
    ran = {line.split("'")[1] for line in exp.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate", "register"}, exp
    assert "l2" in run(["dvc", "exp", "show", "--no-pager", "--json"], project)
