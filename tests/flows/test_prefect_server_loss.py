"""The Prefect server goes away in the middle of an upgrade (issue "Run it like production", faults).

A real `prefect server start` on loopback; `mixbct upgrade` runs against it (PREFECT_API_URL) in a tiny copy of
the project; once the new model's first epoch checkpoint exists, the server's whole process group is killed.
Whatever the flow process then does, it must end (not hang), leave no half-written output and no registered
version unless it finished; after the server is back, a plain re-run must complete, resume training from the
checkpoints instead of starting over, and register exactly one version if the gate passes.

What Prefect 3.9 does here (observed): task states are events, so the flow keeps working without its server
and fails at its next API call (publishing the compatibility table, before registration), after the client's
retries; the process then spends a few minutes retrying to ship its logs before it exits non-zero.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from project_copy import background, copy_project, free_port, stop_group, tail, tool_env, wait_http

from components.io import _STALE

EPOCHS = 40  # long enough (tens of seconds) that the server dies while the new model trains


@pytest.mark.slow
def test_upgrade_can_be_rerun_after_the_prefect_server_dies(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", {"train": {"epochs": EPOCHS}})
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = tool_env(tmp_path, PREFECT_API_URL=api, PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    checkpoints = project / "artifacts" / "checkpoints"

    first_log = tmp_path / "first.log"
    with background(server_cmd, project, server_env, tmp_path / "server1.log") as server:
        wait_http(f"{api}/health", server, tmp_path / "server1.log")
        with background(["mixbct", "upgrade"], project, env, first_log) as first:
            _wait_for(lambda: list(checkpoints.glob("new-*.pt")), first, first_log, timeout=300)
            stop_group(server, grace=0)  # the server goes away: SIGKILL-like, no goodbye to its clients
            try:
                first_rc = first.wait(timeout=600)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the upgrade hung after losing its server:\n{tail(first_log)}") from None

    first_out = first_log.read_text(errors="replace")
    finished = first_rc == 0 and "registered kanji-embedder version" in first_out
    _assert_nothing_half_written(project / "artifacts", swept=False)
    if not finished:  # it failed: no version, no alias, whatever stage it was in
        assert _versions(project) == [], first_out[-4000:]

    # The server comes back (same database), the schedule's next run or a person re-runs the upgrade.
    second_log = tmp_path / "second.log"
    with background(server_cmd, project, server_env, tmp_path / "server2.log") as server:
        wait_http(f"{api}/health", server, tmp_path / "server2.log")
        with background(["mixbct", "upgrade"], project, env, second_log) as second:
            second_rc = second.wait(timeout=600)
    second_out = second_log.read_text(errors="replace")
    assert second_rc == 0, second_out[-4000:]
    _assert_nothing_half_written(project / "artifacts", swept=True)
    if finished:  # the first run completed without its server: the re-run has nothing to do
        assert "nothing to upgrade" in second_out, second_out[-4000:]
    else:
        resumed = re.search(rf"resuming from .*new-\w+\.pt: (\d+) of {EPOCHS} epochs done", second_out)
        assert resumed and int(resumed.group(1)) >= 1, second_out[-4000:]
    versions = _versions(project)
    passed = json.loads((project / "artifacts" / "eval" / "metrics.json").read_text())["criterion"]["passed"]
    assert versions == (["1"] if passed else []), (versions, passed)


def _wait_for(found, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the upgrade ended ({proc.returncode}) before training:\n{tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint after {timeout} s:\n{tail(log)}")


# Each stage output is one folder swapped in whole (components.io.atomic_dir); this is the file it is written with last.
COMPLETE_WITH = {"dataset": "summary.json", "legacy": "info.json", "old_features": "summary.json",
                 "new": "info.json", "paragon": "info.json", "eval": "metrics.json"}  # fmt: skip


def _assert_nothing_half_written(artifacts: Path, swept: bool) -> None:
    """Every stage output folder that exists is complete; after a re-run not even a temp file is left over."""
    for name, last in COMPLETE_WITH.items():
        folder = artifacts / name
        if folder.exists():
            assert (folder / last).is_file(), f"{folder} exists without its {last}: half-written"
    if swept:
        leftovers = [p for p in artifacts.rglob(".*") if _STALE.match(p.name)]
        assert leftovers == [], leftovers


def _versions(project: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    return sorted(str(v.version) for v in client.search_model_versions("name='kanji-embedder'"))
