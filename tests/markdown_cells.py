"""Markdown compared by what it says: table cells and column alignment, not the padding that lines them up."""

from __future__ import annotations

import re


def _alignment(marker: str) -> str:
    if marker.startswith(":") and marker.endswith(":"):
        return "center"
    return "right" if marker.endswith(":") else "left"  # `---` and `:---` are both left


def content(markdown: str) -> list[str | list[str]]:
    """Each line: a table row as its stripped cells (an alignment row as left/right/center), other lines as is."""
    out: list[str | list[str]] = []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            out.append(line.rstrip())
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]  # `\|` is a pipe inside a cell
        if cells and all(re.fullmatch(r":?-+:?", c) for c in cells):
            cells = [_alignment(c) for c in cells]
        out.append(cells)
    return out
