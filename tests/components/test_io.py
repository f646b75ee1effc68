"""Atomic outputs and the work-folder lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from components.errors import UpgradeError
from components.io import MARKER, atomic_dir, claim_workdir, exclusive, sweep_stale, write_text
from components.paths import LAYOUT


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp leftovers


def test_dir_is_replaced_whole(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "d") as d:
        (d / "one").write_text("1")
    with atomic_dir(tmp_path / "d") as d:
        (d / "two").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["two"]


def test_second_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; from components.io import exclusive\n"
         f"with exclusive({str(tmp_path)!r}):\n print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UpgradeError, match=f"already running here \\(pid {holder.pid}\\)"):
            with exclusive(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path):  # released when the holder died
        pass


def test_writes_killed_midway_leave_only_temp_names_that_the_next_run_sweeps(tmp_path: Path, caplog) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")  # a finished output from an earlier run
    writer = subprocess.Popen(
        [sys.executable, "-c", "import time; from components.io import atomic_dir, atomic_path\n"
         f"with atomic_dir({str(tmp_path / 'eval')!r}) as d, atomic_path({str(tmp_path / 'ck.pt')!r}, suffix='.pt') as f:\n"
         " (d / 'metrics.json').write_text('half'); f.write_bytes(b'half')\n print('writing', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()  # SIGKILL: no `finally` runs
    writer.wait()
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(hidden) == 2 and all(".mixbct-tmp" in name for name in hidden), hidden
    assert (tmp_path / "eval" / "metrics.json").read_text() == "{}" and not (tmp_path / "ck.pt").exists()

    with exclusive(tmp_path), caplog.at_level("INFO", logger="components.io"):
        claim_workdir(tmp_path, LAYOUT)
        removed = sweep_stale(tmp_path)
    assert sorted(p.name for p in removed) == hidden
    assert sorted(r.getMessage() for r in caplog.records) == sorted(f"removed an interrupted write: {p}" for p in removed)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", MARKER, "eval"]  # the lock and the finished output stay
