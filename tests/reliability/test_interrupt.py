"""Ctrl-C / SIGTERM during a `mixbct` command (issue 9, item 4): a prompt, quiet exit that leaves nothing running.

Real processes and real signals: each command runs in a session of its own, as under a terminal, and the test
signals its process group (Ctrl-C) or its main process only (`kill PID`, a supervisor's SIGTERM). Every case
checks the exit code, the time to exit, that our one line is the last line on stderr and that no traceback is
printed, and that no process of the group outlives the command.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cases import case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
from project_copy import BIN, stop_group, tool_env  # noqa: E402

from flows.interrupt import GRACE_S, MESSAGE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 10  # the acceptance criterion: exited within 10 s of the signal
EPOCHS = 200  # the tiny model trains for minutes: long enough to be interrupted while training


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = tool_env(cwd, PREFECT_LOGGING_LEVEL="INFO")  # INFO: the "resuming from ..." line of components.train
    with open(log, "wb") as err:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen([str(BIN / "mixbct"), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def _wait_for(what: str, found: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended ({proc.returncode}) before {what}:\n{_text(log)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{_text(log)[-4000:]}")
        time.sleep(0.2)


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


def _alive(pgid: int, family: list[psutil.Process]) -> list[psutil.Process]:
    """The living (non-zombie) processes of a process group, and of `family` wherever they went."""
    alive = []
    for p in [*psutil.process_iter(), *family]:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if (p in family or os.getpgid(p.pid) == pgid) and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _interrupt(proc: subprocess.Popen, sig: signal.Signals, log: Path, whole_group: bool) -> list[str]:
    """Send `sig` and check the common claims; returns the command lines of the descendants it had."""
    family = psutil.Process(proc.pid).children(recursive=True)
    commands = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            commands.append(" ".join(p.cmdline()))
    started = time.monotonic()
    (os.killpg if whole_group else os.kill)(proc.pid, sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace=0)
        raise AssertionError(f"still running 60 s after {sig.name}:\n{_text(log)[-4000:]}") from None
    took = time.monotonic() - started
    print(f"{sig.name} -> exit {rc} in {took:.2f} s")
    err = _text(log)
    assert rc == 128 + sig, (rc, err[-4000:])
    assert took < DEADLINE_S, took
    assert "Traceback" not in err, err[-4000:]
    assert err.count("mixbct: interrupted") == 1 and err.splitlines()[-1] == MESSAGE.format(name=sig.name), err[-2000:]
    deadline = time.monotonic() + 2
    while (left := _alive(proc.pid, family)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, [(p.pid, p.cmdline()) for p in left]
    return commands


@pytest.mark.slow
@case("interruption", "Ctrl-C (SIGINT to the process group) while `mixbct upgrade` trains, then the same command again",
      "exits 130 within seconds with one line and no traceback; the temporary Prefect server and every other process "
      "of the group are gone; the re-run resumes training from the last epoch checkpoint")  # fmt: skip
def test_ctrl_c_during_upgrade_training_then_rerun_resumes(tmp_path: Path, params_factory) -> None:
    params = params_factory(train={"epochs": EPOCHS})
    args = ["upgrade", "--params", str(params), "--workdir", "wd"]
    checkpoints = tmp_path / "wd" / "checkpoints"

    first = _start(args, tmp_path, tmp_path / "first.err")
    try:
        _wait_for("training", lambda: any(checkpoints.glob("new-*.pt")), first, tmp_path / "first.err")
        children = _interrupt(first, signal.SIGINT, tmp_path / "first.err", whole_group=True)
    finally:
        stop_group(first, grace=0)
    assert any("uvicorn" in c for c in children), children  # the temporary Prefect server was there, and is gone

    resumed = re.compile(rf"resuming from \S*new-\w+\.pt: (\d+) of {EPOCHS} epochs done")
    second = _start(args, tmp_path, tmp_path / "second.err")
    log = tmp_path / "second.err"
    try:  # the re-run gets the work-folder lock, resumes, and is interrupted again once it said so
        _wait_for("resume", lambda: bool(resumed.search(_text(log))), second, log)
        _interrupt(second, signal.SIGINT, log, whole_group=True)
    finally:
        stop_group(second, grace=0)
    assert int(resumed.search(_text(log)).group(1)) >= 1


@pytest.mark.slow
@case("interruption", "SIGTERM to the main process of `mixbct upgrade` only (`kill PID`, a supervisor stopping it)",
      "exits 143 within seconds with one line and no traceback, although Prefect swaps in its own SIGTERM handler "
      "during the flow run; the temporary Prefect server it started is stopped too, not orphaned")  # fmt: skip
def test_sigterm_to_upgrade_main_process_stops_the_prefect_server(tmp_path: Path, params_factory) -> None:
    params = params_factory()
    log = tmp_path / "upgrade.err"
    proc = _start(["upgrade", "--params", str(params), "--workdir", "wd"], tmp_path, log)
    try:  # inside the flow run (where Prefect's SIGTERM bridge is installed): a task has finished
        _wait_for("a finished task", lambda: "Finished in state Completed" in _text(log), proc, log)
        children = _interrupt(proc, signal.SIGTERM, log, whole_group=False)
    finally:
        stop_group(proc, grace=0)
    assert any("uvicorn" in c for c in children), children  # the temporary Prefect server was there, and is gone
    assert "Crash detected" not in _text(log)  # Prefect's own SIGTERM path did not run


@case("interruption", "Ctrl-C during `mixbct stage legacy` (no Prefect; what `dvc repro` runs)",
      "exits 130 within seconds with one line and no traceback; the epoch checkpoint is kept for the next run")  # fmt: skip
def test_ctrl_c_during_a_stage(tmp_path: Path, params_factory) -> None:
    params = params_factory(legacy={"epochs": EPOCHS})
    args = ["--params", str(params), "--workdir", "wd"]
    prepared = subprocess.run([str(BIN / "mixbct"), "stage", "prepare", *args], cwd=tmp_path, env=tool_env(tmp_path),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    log = tmp_path / "legacy.err"
    proc = _start(["stage", "legacy", *args], tmp_path, log)
    try:
        _wait_for("a checkpoint", lambda: any((tmp_path / "wd" / "checkpoints").glob("legacy-*.pt")), proc, log)
        _interrupt(proc, signal.SIGINT, log, whole_group=True)
    finally:
        stop_group(proc, grace=0)
    assert list((tmp_path / "wd" / "checkpoints").glob("legacy-*.pt"))


@case("interruption", "Ctrl-C while `mixbct stage prepare` renders images in its process pool",
      "exits 130 within seconds with one line: the forked workers exit quietly (no KeyboardInterrupt traceback "
      "each) and none is left running")  # fmt: skip
def test_ctrl_c_during_the_process_pool(tmp_path: Path, params_factory) -> None:
    params = params_factory(data={"train_identities": 1500, "test_identities": 500, "samples_per_identity": 20})
    log = tmp_path / "prepare.err"
    proc = _start(["stage", "prepare", "--params", str(params), "--workdir", "wd"], tmp_path, log)
    try:
        _wait_for("the pool's workers", lambda: bool(psutil.Process(proc.pid).children()), proc, log, timeout=120)
        time.sleep(0.5)  # the workers are rendering
        children = _interrupt(proc, signal.SIGINT, log, whole_group=True)
    finally:
        stop_group(proc, grace=0)
    assert len(children) >= 2, children
    assert not (tmp_path / "wd" / "dataset").exists()  # nothing half-written in its place


# A command whose child ignores SIGTERM: what the handler does when a descendant will not stop.
_STUBBORN = textwrap.dedent("""
    import subprocess, sys, time
    from flows.interrupt import install
    install()
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE)
    child.stdout.readline()
    print(child.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("second", [False, True], ids=["one-ctrl-c", "two-ctrl-c"])
@case("interruption", "Ctrl-C while a child process ignores SIGTERM, once, or twice in a row",
      f"the child is SIGKILLed after a {GRACE_S:.0f} s grace and the command exits 130; a second Ctrl-C while it "
      "stops kills the child and exits at once")  # fmt: skip
def test_ctrl_c_with_a_child_that_ignores_sigterm(tmp_path: Path, second: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        if second:
            time.sleep(0.5)
            assert proc.poll() is None  # still waiting for the stubborn child
            os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - started
        print(f"{'two' if second else 'one'} Ctrl-C -> exit {rc} in {took:.2f} s")
        assert rc == 130
        assert took < (1.5 if second else GRACE_S + 2), took
        assert took >= (0.5 if second else GRACE_S), took
        with contextlib.suppress(psutil.NoSuchProcess):
            child.wait(timeout=2)
        assert not child.is_running()
        assert proc.stderr.read() == MESSAGE.format(name="SIGINT") + "\n"  # one line, also after two Ctrl-C
    finally:
        stop_group(proc, grace=0)


@case("interruption", "SIGTERM while a Prefect flow runs in the CLI (Prefect installs its own SIGTERM handler then)",
      "mixbct's handler stays in charge: Prefect's handler is routed to it, in the CLI process only")  # fmt: skip
def test_prefect_sigterm_bridge_calls_the_cli_handler(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import signal
        from flows import interrupt
        interrupt.install()
        from prefect.utilities.engine import capture_sigterm  # imported after install(), as in `mixbct upgrade`
        with capture_sigterm():
            assert signal.getsignal(signal.SIGTERM) is interrupt._on_signal, signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is interrupt._on_signal
        print("ok")
    """)
    env = tool_env(tmp_path, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
