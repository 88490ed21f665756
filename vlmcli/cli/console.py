"""Where the CLI writes: results to stdout, everything else (progress, notices, errors) to a
stderr console. Rich honours NO_COLOR and drops styling when stderr is not a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rich.console import Console
from rich.markup import escape
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
        err_console().print(f"[dim]{escape(message)}[/]", highlight=False, soft_wrap=True)


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


# C0 controls except tab and newline, DEL, and C1 controls: a model can emit any byte
# (byte-fallback tokens), and ESC or CSI written raw to a terminal moves the cursor, clears
# the screen or worse. On a terminal they are shown escaped; a pipe gets the text as is.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def terminal_safe(text: str) -> str:
    """`text` with control characters written as visible `\\xNN` escapes."""
    return text.translate(_CONTROLS)


def write_result(text: str) -> None:
    """Write (part of) a result to stdout at once: replies are streamed token by token."""
    out = sys.stdout
    out.write(terminal_safe(text) if out.isatty() else text)
    out.flush()
