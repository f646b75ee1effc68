"""Driver for test_registration_kill.py: SIGKILL a real registration after each of its MLflow calls in turn.

Run as `python kill_registration.py WORKDIR TRACKING_URI ARTIFACT_ROOT FIRST OUT_JSON`. The parent imports
everything once. A first child registers twice without being killed and records the second one's MLflow calls (counting the
outermost `MlflowClient` calls, which every fluent `mlflow.*` call goes through). Then, for every n from FIRST (a
call number, or the name of a call: its first occurrence) to the last call, a child runs `track_and_register` and
kills itself with SIGKILL right after its n-th call returns. After each death a second child plays the registry's
readers: every version that is not complete must be refused by `promote`, invisible to the "nothing to upgrade"
check, and the challenger alias may only be promoted when complete. A third child then runs `recover` (what the
next registration does first) and checks that it deleted the incomplete version and marked the run FAILED, so
every registration starts from the same state and makes the same calls. The parent never opens the store or runs
torch, so the forked children start clean: it takes the gate's decision from the stored criterion with a stand-in
ONNX parity of 0 (`stages.register` measures the real one; what is swept here is the registry's MLflow calls).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import mlflow.onnx  # noqa: F401  (imported once here, not in every forked child)
import mlflow.pyfunc  # noqa: F401
import onnx  # noqa: F401
import onnxruntime  # noqa: F401
from mlflow.models import infer_signature  # noqa: F401
from mlflow.tracking.client import MlflowClient

import components.embed  # noqa: F401
import components.stages  # noqa: F401

from components import gate, registry, stages
from components.config import load_config
from components.errors import UpgradeError
from components.paths import Paths

work, uri, artifacts, first, out_json = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
cfg = load_config(None, {
    "train.embedding_dim": 16, "legacy.embedding_dim": 16,
    "registry.tracking_uri": uri, "registry.artifact_root": artifacts,
})  # fmt: skip
fingerprint = {"params": "p", "data": "d", "old_model": "a" * 64, "gallery": "b" * 64}
criterion = json.loads((Paths(Path(work)).eval / "metrics.json").read_text())["criterion"]
decision = gate.decide(criterion, 0.0, cfg.evaluate.onnx_tolerance)
legacy = stages.legacy_info(Paths(Path(work)))
log = out_json.with_suffix(".calls")

_depth = [0]
_calls: list[str] = []
_kill_at: list[int | None] = [None]


def _counted(name: str, fn):  # noqa: ANN001, ANN202
    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        _depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:  # a call that raised counts too (e.g. create_registered_model when the model exists)
            _depth[0] -= 1
            if _depth[0] == 0:
                _calls.append(name)
                if _kill_at[0] is not None and len(_calls) == _kill_at[0]:
                    with open(log, "a") as f:
                        f.write(f"{_kill_at[0]} {name}\n")
                    os.kill(os.getpid(), signal.SIGKILL)

    return call


for _name, _fn in list(vars(MlflowClient).items()):
    # public calls, and `_create_model_version`, which `mlflow.register_model` calls to create the version
    if callable(_fn) and (not _name.startswith("_") or _name == "_create_model_version"):
        setattr(MlflowClient, _name, _counted(_name, _fn))


def _register(n: int) -> None:
    _kill_at[0] = n
    try:
        out = registry.track_and_register(cfg, Paths(Path(work)), {**fingerprint, "upgrade_key": f"k{n}"}, decision, legacy)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(2)
    os._exit(0 if out.get("registered") else 3)


def _readers(n: int) -> None:
    """What promote and the "nothing to upgrade" check see right after the kill (before any recovery)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    problems: list[str] = []
    client = MlflowClient()
    name = cfg.registry.model_name
    versions = registry._all_versions(client, name)
    complete = {str(v.version) for v in versions if registry.is_complete(v)}
    for v in versions:
        if str(v.version) in complete:
            missing = [t for t in ("run_id", "gallery_sha256", "old_model_sha256", "upgrade_key", "gate.passed") if t not in v.tags]
            if missing:
                problems.append(f"complete version {v.version} lacks tags {missing}")
            continue
        try:
            registry.promote(cfg.registry, str(v.version))
            problems.append(f"incomplete version {v.version} was promoted")
        except UpgradeError as err:
            if "incomplete" not in str(err):
                problems.append(f"incomplete version {v.version} refused for another reason: {err}")
    found = registry.find_registered(cfg.registry, f"k{n}")
    if found is not None and str(found["version"]) not in complete:
        problems.append(f"find_registered returned incomplete version {found['version']}")
    challenger = registry._alias_version(client, name, registry.CHALLENGER) if versions else None
    if challenger is not None and str(challenger.version) not in complete:
        try:
            registry.promote(cfg.registry)
            problems.append(f"@challenger (incomplete version {challenger.version}) was promoted")
        except UpgradeError:
            pass
    print(json.dumps(problems))
    os._exit(1 if problems else 0)


def _recover(n: int) -> None:
    """The next registration's first step: the killed run FAILED, the incomplete version gone."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    done = registry.recover(cfg.registry)
    left = [v.version for v in registry._all_versions(client, cfg.registry.model_name) if not registry.is_complete(v)]
    exp = registry._experiment(cfg.registry)
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") if exp else []
    problems = [f"incomplete versions left: {left}"] * bool(left) + [f"runs left RUNNING: {len(running)}"] * bool(running)
    print(json.dumps({"n": n, **done, "problems": problems}))
    os._exit(1 if problems else 0)


def _child(target, n: int) -> int:  # noqa: ANN001
    pid = os.fork()
    if pid == 0:
        target(n)
    return os.waitpid(pid, 0)[1]


def main() -> None:
    status = _child(lambda n: (_kill_at.__setitem__(0, None), _dry_run()), 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the registration without a kill failed"
    calls = log.with_suffix(".dry").read_text().split()
    start = int(first) if first.isdigit() else calls.index(first) + 1
    results = []
    for n in range(start, len(calls) + 1):
        status = _child(_register, n)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        readers = _child(_readers, n)
        recovered = _child(_recover, n)
        results.append({
            "n": n, "call": calls[n - 1], "killed": killed, "exit": None if killed else os.WEXITSTATUS(status),
            "readers_ok": os.WEXITSTATUS(readers) == 0, "recovered_ok": os.WEXITSTATUS(recovered) == 0,
        })  # fmt: skip
    status = _child(_register, len(calls) + 1)  # beyond the last call: completes
    killed_at = dict(line.split(" ", 1) for line in log.read_text().splitlines()) if log.exists() else {}
    for r in results:  # the call each child died after: the same as the dry run's, or the numbering drifted
        r["killed_call"] = killed_at.get(str(r["n"]), "").strip()
    results.append({"n": len(calls) + 1, "call": "", "killed": False, "exit": os.WEXITSTATUS(status), "readers_ok": True, "recovered_ok": True})
    out_json.write_text(json.dumps(results, indent=1))


def _dry_run() -> None:
    try:  # the first registration creates the experiment and the model; the second makes every later one's calls
        registry.track_and_register(cfg, Paths(Path(work)), {**fingerprint, "upgrade_key": "dry-run-1"}, decision, legacy)
        _calls.clear()
        registry.track_and_register(cfg, Paths(Path(work)), {**fingerprint, "upgrade_key": "dry-run-2"}, decision, legacy)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        os._exit(2)
    log.with_suffix(".dry").write_text("\n".join(_calls))
    os._exit(0)


if __name__ == "__main__":
    main()
