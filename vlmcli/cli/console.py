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
    phase: str = "starting"  # what the command was doing, for out-of-memory messages


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


def show_progress() -> bool:
    """Progress is drawn only on a terminal, and never under -q."""
    return not state.quiet and err_console().is_terminal


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator:
    """A progress bar with an ETA on stderr, yielding an `update(done, total)` callback (None
    when nothing is drawn: under -q or when stderr is not a terminal)."""
    if not show_progress():
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
        # Rich would otherwise reroute print() through the stderr console: results must stay on stdout
        redirect_stdout=False,
        redirect_stderr=False,
    ) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
