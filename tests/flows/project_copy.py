"""Helpers for slow tests that run the real tools (dvc, prefect, mlflow) on a tiny copy of the project.

A copy holds the git-tracked files of this checkout (as they are in the working tree), the embedded KanjiVG
source under data/kanjivg, and a params.yaml shrunk to a seconds-long upgrade. It is a git repository of its
own with data/ tracked by DVC, so `dvc repro`, `dvc push` and `prefect deploy` behave as on a fresh clone.
Processes started here get the offline environment of stack-notes.md and a PREFECT_HOME of their own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from flows.cli import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A seconds-long upgrade on the embedded data (each key updates the section of the project's params.yaml).
TINY: dict[str, dict[str, Any]] = {
    "data": {"train_identities": 60, "test_identities": 40, "samples_per_identity": 6, "gallery_per_identity": 1,
             "query_per_identity": 2},
    "legacy": {"epochs": 1, "batch_size": 32, "embedding_dim": 16},
    "train": {"epochs": 1, "batch_size": 32, "embedding_dim": 16},
}  # fmt: skip

# Not copied: data.dvc is written again for the copied data; dvc.lock describes the full-size run.
_SKIP = {"data.dvc", "dvc.lock"}


def tool_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment for a real tool in a subprocess: offline, quiet, venv first, PREFECT_HOME in `tmp`."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **OFFLINE_ENV,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "MIXBCT_PROGRESS": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for inherited in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # set by earlier tests
        env.pop(inherited, None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command to completion; fail the test with its output when it exits non-zero."""
    # PYTHONPATH: the copy's own code runs (ahead of the editable install's finder, which points at this checkout)
    env = dict(env) if env is not None else tool_env(cwd.parent, PYTHONPATH=str(cwd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def git_commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], project)


def copy_project(dest: Path, params: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Copy the tracked project into `dest`, shrink params.yaml (TINY, then `params`), git init, `dvc add data`."""
    from components.data.kanjivg import copy_source

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel in _SKIP or not (ROOT / rel).is_file():
            continue  # skipped, or deleted in the working tree
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    copy_source(dest / "data" / "kanjivg")
    values = yaml.safe_load((dest / "params.yaml").read_text())
    for section, update in [*TINY.items(), *(params or {}).items()]:
        values.setdefault(section, {}).update(update)
    (dest / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["dvc", "add", "-q", "data"], dest)
    git_commit(dest, "init")
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run a long-lived command in its own process group; on exit stop the whole group (TERM, then KILL)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop `proc`, its process group and every descendant (a Prefect worker starts flow runs in new sessions).

    SIGTERM first, up to `grace` s to exit, then SIGKILL to whatever is left.
    """
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    psutil.wait_procs(family, timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # group members that outlived the leader
    for child in family:
        with contextlib.suppress(psutil.Error):
            child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail early (with the log) if the server process died."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) before answering {url}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else "(no log)"
