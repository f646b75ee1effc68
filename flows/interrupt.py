"""Clean interruption of a `mixbct` command: Ctrl-C or SIGTERM stops it within seconds, exit 130 / 143.

Installed by the CLI entry point only (`flows.cli.main`), never when a library module is imported.

Why a hard exit is safe: training checkpoints every epoch and every stage output is written atomically (temp +
rename; the next run sweeps the temp files), the work-folder lock is an flock that the OS drops, and an MLflow
run left RUNNING is cleaned up by the next run. So nothing is gained by unwinding the stack, and a lot is lost:
Ctrl-C reaches the whole process group, the temporary Prefect server (a uvicorn child) dies first, and the
unwinding flow would spend minutes in the Prefect client's retries (and its atexit log shipping) before ending
with a ConnectError traceback.

Prefect's client retries are left as they are, on purpose: on interruption this module never calls the client, so
they cannot delay the exit, and lowering them would change how an upgrade rides out a real server outage
(tests/flows/test_prefect_server_loss.py).

What the handler does, once: stop every descendant process (the temporary Prefect server, process-pool and
DataLoader workers) with SIGTERM, SIGKILL what is left after a short wait, flush stdout/stderr, print one line
and `os._exit(128 + signal)`. A second signal while stopping SIGKILLs the descendants and exits at once.

Not done: reporting the Prefect flow run as Crashed. With the temporary server it stops with us anyway; against a
real server (PREFECT_API_URL) the run stays Running in the UI, as after a SIGKILL. Under a Prefect worker or
`serve()` the flow runs in Prefect's own process, without this module, and Prefect handles signals itself.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import signal
import sys
from types import FrameType, ModuleType
from typing import Any

import psutil

MESSAGE = "mixbct: interrupted ({name}); checkpoints and finished stages are kept, run the same command again to resume"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 3.0  # how long children get to exit after SIGTERM before SIGKILL

_owner: int | None = None  # the pid that installed the handlers (forked workers inherit them)
_stopping = False
_said = False
_family: list[psutil.Process] = []  # every descendant, once stopping


def install() -> None:
    """Route SIGINT and SIGTERM of this process to `_on_signal`, also while a Prefect flow runs."""
    global _owner
    _owner = os.getpid()
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    _keep_sigterm_during_flow_runs()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _stopping
    code = 128 + signum
    if os.getpid() != _owner:
        # A forked worker (ProcessPoolExecutor, DataLoader) that got the group's Ctrl-C: its parent does the
        # talking and the cleaning; exit quietly instead of printing a KeyboardInterrupt traceback.
        os._exit(code)
    if _stopping:  # a second signal while stopping: no more waiting
        with contextlib.suppress(Exception):
            _kill(_family or _descendants())
        _say(signum)
        os._exit(code)
    _stopping = True
    with contextlib.suppress(Exception):  # whatever happens, exit below
        _stop_descendants()
    _say(signum)
    os._exit(code)


def _say(signum: int) -> None:
    """Flush what the command wrote, then the one line (once), last: a live progress bar (rich, on a terminal)
    redraws over anything printed before the process ends."""
    global _said
    _flush()
    if not _said:
        _said = True
        with contextlib.suppress(Exception):
            # On a terminal, show the cursor the bar hid and start a fresh line below it.
            lead = "\x1b[?25h\n" if sys.stderr.isatty() else ""
            sys.stderr.write(lead + MESSAGE.format(name=signal.Signals(signum).name) + "\n")
    _flush()


def _stop_descendants() -> None:
    """SIGTERM every descendant, wait up to GRACE_S, SIGKILL the rest (none is left orphaned)."""
    _family[:] = _descendants()
    for child in _family:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(_family, timeout=GRACE_S)
    _kill(alive)
    psutil.wait_procs(alive, timeout=1)


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _kill(processes: list[psutil.Process]) -> None:
    for child in processes:
        with contextlib.suppress(Exception):
            child.kill()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# Prefect replaces the SIGTERM handler while a flow runs (prefect.utilities.engine.capture_sigterm installs
# `_prefect_sigterm_handler`, which raises TerminationSignal so that the engine reports a crash to the API and
# re-sends the signal afterwards). In our in-process CLI run that report goes to a server that may be dying with
# us, with the client's retries; and the engine logs "Crash detected!" lines. So in the CLI the bridge calls our
# handler instead. Under a Prefect worker/deployment this module is not installed and Prefect keeps its own.
_PREFECT_ENGINE = "prefect.utilities.engine"


def _keep_sigterm_during_flow_runs() -> None:
    if _PREFECT_ENGINE in sys.modules:
        _defer_prefect_bridge(sys.modules[_PREFECT_ENGINE])
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        # Patched when Prefect is first imported: importing it here would cost every command ~1.7 s.
        sys.meta_path.insert(0, _PatchAfterImport())


def _defer_prefect_bridge(module: ModuleType) -> None:
    if hasattr(module, "_prefect_sigterm_handler"):
        module._prefect_sigterm_handler = _on_signal  # looked up at call time by capture_sigterm()


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_defer_prefect_bridge` on prefect.utilities.engine right after it is imported."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != _PREFECT_ENGINE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _defer_prefect_bridge(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec
