"""The `nightly` deployment of prefect.yaml, served for real: server, process work pool, deploy, worker, run.

On a tiny copy of the project, as README "Run it on a schedule" does it: `prefect server start`,
`prefect work-pool create`, `prefect --no-prompt deploy --all`, `prefect worker start`, then
`prefect deployment run upgrade/nightly`. The run must complete in the copy (the pull step's working directory)
and leave an MLflow run there whose registration decision agrees with the evaluation's criterion.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from project_copy import background, copy_project, free_port, run, tail, tool_env, wait_http

FLOW_RUN_TIMEOUT_S = 360
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.mark.slow
def test_nightly_deployment_runs_on_a_worker(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", {"train": {"epochs": 2}})
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = tool_env(
        tmp_path,
        PREFECT_API_URL=api,
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_LOGGING_LEVEL="INFO",
        PWD=str(tmp_path),  # a stale shell PWD must not matter: the build step reads the real folder
    )
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server_cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(server_cmd, project, server_env, server_log) as server:
        wait_http(f"{api}/health", server, server_log, timeout=120)
        run(["prefect", "work-pool", "create", "mixbct-local", "--type", "process"], project, env, timeout=120)
        deployed = run(["prefect", "--no-prompt", "deploy", "--all"], project, env, timeout=120)
        assert "upgrade/nightly" in deployed, deployed

        deployment = httpx.get(f"{api}/deployments/name/upgrade/nightly", timeout=30).json()
        (schedule,) = deployment["schedules"]
        assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
        assert schedule["schedule"]["timezone"] == "Europe/Berlin"
        assert deployment["parameters"] == {"params": "params.yaml", "workdir": "artifacts"}
        assert deployment["work_pool_name"] == "mixbct-local"
        (pull,) = deployment["pull_steps"]  # resolved at deploy time to the folder deployed from
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)

        worker_env = {**env, "PWD": str(tmp_path)}  # the worker's own folder: only the pull step leads to the copy
        worker_cmd = ["prefect", "worker", "start", "--pool", "mixbct-local"]
        with background(worker_cmd, tmp_path, worker_env, worker_log) as worker:
            started = run(["prefect", "deployment", "run", "upgrade/nightly"], tmp_path, env, timeout=60)
            flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started)
            assert flow_run_id, started
            flow_run = _wait_for_flow_run(api, flow_run_id.group(1), worker, worker_log)
        assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}\n{tail(worker_log, 120)}"

        artifacts = httpx.post(f"{api}/artifacts/filter", timeout=30,
                               json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}).json()  # fmt: skip
        keys = {a["key"] for a in artifacts}
        assert {"compatibility-table", "gate-verdict", "mlflow-run"} <= keys, keys

    # The run worked in the copy: params.yaml and artifacts/ relative to the pull step's directory.
    metrics = json.loads((project / "artifacts/eval/metrics.json").read_text())
    passed = metrics["criterion"]["passed"]
    verdict = next(a["data"] for a in artifacts if a["key"] == "gate-verdict")
    _check_registration(project, passed, verdict)


def _wait_for_flow_run(api: str, flow_run_id: str, worker, worker_log: Path) -> dict:
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30).json()
        if flow_run["state"]["type"] in TERMINAL:
            return flow_run
        if worker.poll() is not None:
            raise AssertionError(f"worker exited ({worker.returncode}):\n{tail(worker_log)}")
        time.sleep(3)
    httpx.post(f"{api}/flow_runs/{flow_run_id}/set_state", timeout=30,
               json={"state": {"type": "CANCELLING"}, "force": True})  # fmt: skip
    raise AssertionError(f"flow run {flow_run_id} not finished after {FLOW_RUN_TIMEOUT_S} s "
                         f"(state {flow_run['state']['type']}):\n{tail(worker_log, 120)}")  # fmt: skip


def _check_registration(project: Path, passed: bool, verdict: str) -> None:
    """The copy's own MLflow store (params.yaml's relative tracking URI) holds one run, consistent with the gate."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mixbct-upgrade")
    assert experiment is not None and experiment.artifact_location.startswith((project / "mlflow").as_uri())
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.data.tags["gate.passed"] == str(passed)
    assert mlflow_run.data.params["train.epochs"] == "2"
    versions = client.search_model_versions("name='kanji-embedder'")
    if passed:
        assert [str(v.version) for v in versions] == ["1"]
        assert str(client.get_model_version_by_alias("kanji-embedder", "challenger").version) == "1"
        assert mlflow_run.data.tags["registration"] == "kanji-embedder/1"
        assert "registered kanji-embedder version 1" in verdict
    else:
        assert versions == []
        assert mlflow_run.data.tags["registration"] == "refused"
        reason = mlflow_run.data.tags["registration.reason"]
        assert reason and reason in verdict
