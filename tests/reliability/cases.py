"""The reliability suite's catalogue: every case a hostile, careful user tried, and what must happen.

Each test in tests/reliability/ is decorated with `@case(area, what_the_user_does, what_happens)`. The decorator
records the pair here and marks the test `reliability`; `python tests/reliability/cases.py` prints the README's
table from this catalogue, and `test_readme_table.py` fails when the README's table and the tests disagree.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"


@dataclass(frozen=True)
class Case:
    area: str
    does: str  # what the user does (or what goes wrong)
    happens: str  # what the project does about it: exit code, message, what is left on disk / in the registry
    test: str  # module::function


CATALOGUE: list[Case] = []


def case(area: str, does: str, happens: str) -> Callable[[Any], Any]:
    """Register a reliability case for the decorated test (or for every parametrisation of it)."""

    def mark(fn: Any) -> Any:
        CATALOGUE.append(Case(area, does, happens, f"{Path(fn.__code__.co_filename).name}::{fn.__name__}"))
        return pytest.mark.reliability(fn)

    return mark


def collect() -> list[Case]:
    """Import every test module of the suite and return its cases, in file then definition order."""
    CATALOGUE.clear()
    for path in sorted(HERE.glob("test_*.py")):
        name = f"_reliability_{path.stem}"
        if name in sys.modules:
            del sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return list(CATALOGUE)


def table(cases: list[Case]) -> str:
    lines = ["| # | area | case | what happens | test |", "|---:|---|---|---|---|"]
    for i, c in enumerate(cases, 1):
        lines.append(f"| {i} | {c.area} | {c.does} | {c.happens} | `{c.test}` |")
    return "\n".join(lines)


def readme_block(cases: list[Case]) -> str:
    return f"{BEGIN}\n{table(cases)}\n{END}"


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    import cases as this  # the module the test files import, so their decorators fill this catalogue

    found = this.collect()
    text = README.read_text(encoding="utf-8")
    if "--write" in sys.argv:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        README.write_text(text[:start] + this.readme_block(found) + text[stop:], encoding="utf-8")
        print(f"{README}: {len(found)} reliability cases written")
    else:
        print(this.table(found))
