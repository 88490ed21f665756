"""Where the CLI writes: results to stdout, everything else (progress, notices, errors) to a
stderr console. Rich honours NO_COLOR and drops styling when stderr is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


@dataclass
class _State:
    debug: bool = False
    quiet: bool = False


state = _State()
_stderr: Console | None = None


def err_console() -> Console:
    global _stderr
    if _stderr is None:
        _stderr = Console(stderr=True)
    return _stderr


def notice(message: str) -> None:
    """A one-line remark on stderr (silenced by -q)."""
    if not state.quiet:
        err_console().print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator:
    """A progress bar on stderr, yielding an `update(done, total)` callback. Nothing is drawn
    under -q or when stderr is not a terminal."""
    console = err_console()
    if state.quiet or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
