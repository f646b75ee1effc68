"""The layering, checked: import-linter's contracts in pyproject.toml ([tool.importlinter]) must all hold.

components never imports flows or Prefect; only components.registry imports MLflow and only components.validation
Great Expectations; no import cycles among the modules of components. Imports inside functions count too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_contracts_hold() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lint-imports failed (exit {proc.returncode}):\n{report}"
    assert " 0 broken" in report, report
