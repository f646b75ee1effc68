"""Progress bars for long work (rich). Quiet when MIXBCT_PROGRESS=0, e.g. under tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar on stderr unless MIXBCT_PROGRESS=0."""
    if os.environ.get("MIXBCT_PROGRESS", "1") == "0":
        yield lambda n=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # stderr, as promised: stdout may carry a result (`mixbct evaluate --json`)
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
