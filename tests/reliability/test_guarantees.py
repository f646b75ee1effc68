"""Guarantees a hostile, careful user checks: bad params never run defaults or write folders, YAML and .npz files
are loaded safely, a held work folder is refused, and `doctor` / `promote` never touch what they did not write."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from cases import case
from outcome import refused as _refused
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ params


@case("params", "`mixbct stage prepare` or `mixbct upgrade` with `-p missing.yaml` (a typo in the file name)",
      "exit 1: 'missing.yaml: params file not found'; the built-in defaults never run; no work folder created")  # fmt: skip
@pytest.mark.parametrize("command", [["stage", "prepare"], ["upgrade"]])
def test_missing_params_file(command: list[str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = runner.invoke(app, [*command, "-p", str(tmp_path / "missing.yaml"), "-w", str(work)])
    _refused(result, "missing.yaml: params file not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@case("params", "`mixbct promote` or `mixbct rollback` with `-p typo.yaml` (no such file)",
      "exit 1 naming typo.yaml; no mlflow.db (nor anything else) is created in the current folder")  # fmt: skip
@pytest.mark.parametrize("command", [["promote"], ["rollback"]])
def test_registry_command_with_missing_params(command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [*command, "-p", "typo.yaml"])
    _refused(result, "typo.yaml: params file not found")
    assert list(tmp_path.rglob("*")) == []  # no mlflow.db, no mlruns/, no .prefect/


@case("params", "`mixbct promote`, `rollback` or `doctor` whose registry.tracking_uri is a sqlite file that does not exist",
      "exit 1: 'no MLflow store at <file>'; the file is still absent (these commands never create stores)")  # fmt: skip
@pytest.mark.parametrize("command", ["promote", "rollback", "doctor"])
def test_registry_command_never_creates_a_store(command: str, tmp_path: Path, params_factory) -> None:
    db = tmp_path / "elsewhere" / "mlflow.db"
    params = params_factory(registry={"tracking_uri": f"sqlite:///{db}"})
    result = runner.invoke(app, [command, "-p", str(params)])
    _refused(result, "no MLflow store", str(db))
    assert not db.exists() and not db.parent.exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


@case("params", "a typo in an architecture: `train.arch: resnet_smal` or `legacy.arch: nope`",
      "exit 1 naming the field and listing the known architectures, before any folder is written")  # fmt: skip
@pytest.mark.parametrize(("section", "value"), [("train", "resnet_smal"), ("legacy", "nope")])
@pytest.mark.parametrize("command", [["stage", "prepare"], ["upgrade"]])
def test_unknown_arch_lists_known_ones(section: str, value: str, command: list[str], tmp_path: Path, params_factory) -> None:
    from components.models import available_archs

    params = params_factory(**{section: {"arch": value}})
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, [*command, "-p", str(params), "-w", str(tmp_path / "work")])
    out = _refused(result, f"{section}.arch", f"unknown architecture {value!r}", "known:", *available_archs())
    assert "params.yaml" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no work/, no mlflow.db


@case("params", "`train.lr: .inf` or `train.method_args: {alpha: .nan}` in params.yaml",
      "exit 1 naming the field ('finite number'), before training starts; no work folder created")  # fmt: skip
@pytest.mark.parametrize(
    ("field", "value"), [("lr", float("inf")), ("method_args.alpha", float("nan")), ("lr", float("-inf"))]
)
def test_non_finite_numbers_are_refused(field: str, value: float, tmp_path: Path, params_factory) -> None:
    *outer, key = field.split(".")
    section: dict = {key: value}
    for name in reversed(outer):  # "method_args.alpha" -> {"method_args": {"alpha": value}}
        section = {name: section}
    params = params_factory(train=section)
    assert f"{key}: {'.nan' if value != value else ('.inf' if value > 0 else '-.inf')}" in params.read_text()
    result = runner.invoke(app, ["stage", "prepare", "-p", str(params), "-w", str(tmp_path / "work")])
    _refused(result, f"train.{field}", "finite number")
    assert not (tmp_path / "work").exists()


@case("params", "params.yaml is not YAML, not a mapping of sections, or not UTF-8",
      "exit 1 with one message naming the file and what is wrong; no traceback; no work folder created")  # fmt: skip
@pytest.mark.parametrize(
    ("content", "says"),
    [(b"train: {epochs: [3\n", "not valid YAML"), (b"- train\n- legacy\n", "expected a mapping of sections"),
     (b"train:\n  method: \xff\xfe mixbct\n", "not valid YAML"), (b"just a sentence\n", "expected a mapping")],
    ids=["broken-yaml", "a-list", "latin-1", "a-scalar"],
)  # fmt: skip
def test_unreadable_params_file(content: bytes, says: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_bytes(content)
    result = runner.invoke(app, ["stage", "prepare", "-p", str(params), "-w", str(tmp_path / "work")])
    _refused(result, f"{params}: {says}")
    assert not (tmp_path / "work").exists()


# ------------------------------------------------------------------------------------------------ safe loading


@case("safe loading", "params.yaml holds a Python object tag (`!!python/object/apply:os.system [touch pwned]`)",
      "exit 1 naming the file (not valid YAML: safe_load refuses the tag); the command never runs; no work folder")  # fmt: skip
@pytest.mark.parametrize("command", [["stage", "prepare"], ["promote"], ["doctor"]])
def test_python_tag_in_params_never_runs(command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    params = tmp_path / "params.yaml"
    params.write_text(f'train:\n  method: !!python/object/apply:os.system ["touch {marker}"]\n')
    args = [*command, "-p", str(params)] + (["-w", str(tmp_path / "work")] if command[0] == "stage" else [])
    out = _refused(runner.invoke(app, args), f"{params}: not valid YAML")
    assert "python/object/apply:os.system" in out
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@case("safe loading", "old gallery .npz whose `paths` is an object array (loading it would need pickle)",
      "`mixbct stage legacy` exits 1 naming the file and the field (`paths` must be a string array); "
      "never unpickled; no legacy/ written")  # fmt: skip
def test_object_array_gallery_is_refused(tmp_path: Path) -> None:
    from components.embed import export_onnx
    from components.models import build_backbone

    work, n_gallery = tmp_path / "work", 6
    (work / "dataset").mkdir(parents=True)  # a prepared work folder as far as the legacy stage reads it
    sources = [f"faces/id{i}/0.png" for i in range(n_gallery)]
    rows = "".join(f"g{i},{src},0,id{i},gallery,{i}\n" for i, src in enumerate(sources))
    (work / "dataset" / "manifest.csv").write_text("id,source,sample,identity,split,label\n" + rows)
    export_onnx(build_backbone("small_cnn", 16, 32), tmp_path / "old.onnx", 32)
    gallery = tmp_path / "gallery.npz"
    np.savez(gallery, embeddings=np.ones((n_gallery, 16), dtype=np.float32), paths=np.array(sources, dtype=object))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"old": {"model": str(tmp_path / "old.onnx"), "gallery": str(gallery)}}))
    result = runner.invoke(app, ["stage", "legacy", "-p", str(params), "-w", str(work)])
    _refused(result, "gallery.npz", "`paths` must be a string array, not objects")
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == [".lock", ".mixbct-workdir", "dataset", "dataset/manifest.csv"]


# ------------------------------------------------------------------------------------------------ the work-folder lock


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A live upgrade's stand-in: it holds `exclusive(folder)`, has claimed the folder and is half-way through an
    atomic write of dataset/images.npy, until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom pathlib import Path\n"
         "from components.io import atomic_path, claim_workdir, exclusive\nfrom components.paths import LAYOUT\n"
         f"w = Path({str(folder)!r})\n"
         "with exclusive(w):\n claim_workdir(w, LAYOUT)\n"
         " with atomic_path(w / 'dataset' / 'images.npy', suffix='.npy') as f:\n"
         "  f.write_bytes(b'half'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@contextlib.contextmanager
def _held(work: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A work folder with the holder's finished output, whose lock a live process holds mid-write."""
    (work / "dataset").mkdir(parents=True)
    (work / "dataset" / "manifest.csv").write_text("the holder's output\n")
    holder = _hold_lock(work)
    try:
        yield work, holder
    finally:
        holder.kill()
        holder.wait()


def _holders_files(work: Path) -> dict[str, bytes]:
    return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


def _upgrade_on_held(tmp_path: Path, params: Path) -> tuple[object, int, dict[str, bytes], dict[str, bytes], float]:
    """`mixbct upgrade` on a work folder held by a live holder: (result, holder pid, files before, after, seconds)."""
    import time

    with _held(tmp_path / "work") as (work, holder):
        before = _holders_files(work)
        assert any(name.startswith("dataset/.images.npy.") for name in before), before  # the holder's write
        started = time.perf_counter()
        result = runner.invoke(app, ["upgrade", "-p", str(params), "-w", str(work)])
        elapsed = time.perf_counter() - started
        return result, holder.pid, before, _holders_files(work), elapsed


@case("lock", "a second `mixbct upgrade` on a work folder whose `.lock` a live upgrade holds",
      "refused before any stage runs: exit 1, 'an upgrade is already running here (pid N)'; the holder's files, "
      "its temp file mid-write included, are left exactly as they were")  # fmt: skip
@pytest.mark.usefixtures("prefect_harness")
def test_upgrade_on_a_held_work_folder(tmp_path: Path, params_factory) -> None:
    result, pid, before, after, elapsed = _upgrade_on_held(tmp_path, params_factory())
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error == [f"error: {tmp_path / 'work'}: an upgrade is already running here (pid {pid}); wait for it or "
                     "use another --workdir"], result.output  # fmt: skip
    assert after == before
    assert elapsed < 30, f"refused only after {elapsed:.0f} s"


@case("lock", "`mixbct upgrade` refused inside its flow (here: the work folder is held)",
      "one `error:` line and exit 1, as for errors found before the flow starts; no Prefect traceback")  # fmt: skip
@pytest.mark.usefixtures("prefect_harness")
def test_upgrade_refused_inside_the_flow_shows_no_traceback(tmp_path: Path, params_factory) -> None:
    import logging

    class Keep(logging.Handler):
        records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    # Prefect's console handler keeps the stream of the first CliRunner it saw, so its lines are read here
    keep, loggers = Keep(level=logging.ERROR), [logging.getLogger("prefect"), logging.getLogger("prefect.flow_runs")]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        result, pid, _, _, _ = _upgrade_on_held(tmp_path, params_factory())
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    _refused(result, f"already running here (pid {pid})")
    shown = [r.getMessage()[:120] for r in keep.records if r.exc_info or "Traceback" in r.getMessage()]
    assert shown == [], shown


@case("lock", "`mixbct stage prepare` (what `dvc repro` runs) on a work folder a live `mixbct upgrade` holds",
      "refused at once: exit 1, 'already running here'; the holder's dataset/ is not rewritten")  # fmt: skip
def test_stage_on_a_held_work_folder(tmp_path: Path, params_factory) -> None:
    with _held(tmp_path / "work") as (work, _):
        before = _holders_files(work)
        result = runner.invoke(app, ["stage", "prepare", "-p", str(params_factory()), "-w", str(work)])
        after = _holders_files(work)
        _refused(result, str(work), "already running here")
        assert after == before


# ------------------------------------------------------------------------------------------------ registry


def _store_with_a_version(tmp_path: Path, params: Path, registry_inputs):
    """A real store: version 1 registered completely by `stages.register` (@challenger)."""
    from components import stages
    from components.config import load_config

    cfg = load_config(params)
    paths, fingerprint = registry_inputs(tmp_path / "work", compatible=True)
    out = stages.register(cfg, paths, fingerprint)
    assert out["registered"] and out["version"] == 1, out
    return cfg, out


@case("registry", "`mixbct doctor`, then `mixbct promote N`, where version N was registered by hand "
      "(no `registration=complete` tag, no mixbct process tags)",
      "doctor reports it as 'left' and never deletes it; promote exits 1: 'version N is incomplete'; "
      "@champion is not set")  # fmt: skip
def test_hand_registered_version_is_left_alone(tmp_path: Path, params_factory, registry_inputs) -> None:
    import mlflow
    from mlflow import MlflowClient

    params = params_factory()
    cfg, first = _store_with_a_version(tmp_path, params, registry_inputs)
    name = cfg.registry.model_name
    mlflow.set_tracking_uri(cfg.registry.tracking_uri)
    by_hand = mlflow.register_model(f"runs:/{first['run_id']}/model", name, tags={"gate.passed": "True", "note": "mine"})
    assert str(by_hand.version) == "2"

    result = runner.invoke(app, ["doctor", "-p", str(params)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich folds stdout at 80 columns when it is not a terminal
    assert f"left: {name} version 2: incomplete, not written by a registration on this host; left as it is" in said
    assert "deleted" not in said and "incomplete [2]" in said
    client = MlflowClient(cfg.registry.tracking_uri)
    assert client.get_model_version(name, "2").tags == {"gate.passed": "True", "note": "mine"}  # untouched

    result = runner.invoke(app, ["promote", "2", "-p", str(params)])
    _refused(result, f"{name} version 2 is incomplete")
    assert "champion" not in client.get_registered_model(name).aliases
    assert {str(v.version) for v in client.search_model_versions(f"name='{name}'")} == {"1", "2"}


@case("registry", "a run left RUNNING by a process that was SIGKILLed, next to a RUNNING run whose process is alive",
      "`mixbct doctor` marks the dead one FAILED and says so; the live one stays RUNNING and is not named")  # fmt: skip
def test_doctor_fails_only_dead_running_runs(tmp_path: Path, params_factory) -> None:
    from mlflow import MlflowClient

    from components import registry
    from components.config import load_config

    params = params_factory()
    cfg = load_config(params).registry
    experiment_id = registry.connect(cfg)
    child = subprocess.Popen(
        [sys.executable, "-c", "import mlflow, time\nfrom components.registry import _process_tags\n"
         f"mlflow.set_tracking_uri({cfg.tracking_uri!r})\n"
         f"run = mlflow.start_run(experiment_id={experiment_id!r}, tags=_process_tags())\n"
         "print(run.info.run_id, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert child.stdout is not None
        dead = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(dead).info.status == "RUNNING" and client.get_run(dead).data.tags["mixbct.pid"] == str(child.pid)
    alive = client.create_run(experiment_id, tags=registry._process_tags()).info.run_id  # this test's own pid

    result = runner.invoke(app, ["doctor", "-p", str(params)])
    assert result.exit_code == 0, result.output
    assert f"marked run {dead} FAILED (its process had died)" in result.output
    assert alive not in result.output
    assert client.get_run(dead).info.status == "FAILED"
    assert client.get_run(dead).data.tags["mixbct.recovered"] == "its process died while the run was RUNNING"
    assert client.get_run(alive).info.status == "RUNNING"
    client.set_terminated(alive)
