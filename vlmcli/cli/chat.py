"""`vlm chat`: a conversation in the terminal, over `vlmcli.chat.ChatSession`.

On a terminal: line editing and a persistent history (prompt_toolkit), replies streamed as
they are generated, Ctrl-C to stop a reply, Ctrl-D or /exit to quit. With stdin or stdout
not a terminal, each line of stdin is one user message and the replies are written to
stdout as plain text, so a chat can be scripted: `printf 'q1\\nq2\\n' | vlm chat`.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from rich.markup import escape

from vlmcli import inputs
from vlmcli.cli import options
from vlmcli.cli.common import load_pipeline, sampling_options, set_max_image_pixels
from vlmcli.cli.console import err_console, notice, state, write_result
from vlmcli.errors import UsageError, VlmError

if TYPE_CHECKING:  # torch comes with these: imported when the command runs, not for --help
    from vlmcli.chat import ChatSession, Reply

PROMPT = "> "
CONTINUATION = ". "

HELP = """\
Type a message and press Enter to send it.
  Alt-Enter (or Esc, Enter) starts a new line; so does a line ending in \\
  /image PATH|URL    add a picture to your next message
  /clear             forget the conversation and its pictures
  /save FILE         write the conversation to FILE as JSON (pictures by path)
  /set NAME VALUE    change a sampling option: {names}
  /set               show the sampling options
  /help              this help
  /exit              quit (Ctrl-D does too)
Ctrl-C stops a reply and keeps the conversation; Up and Down recall earlier lines."""

# /set names -> SamplingOptions fields, and how to read a value
SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "max_tokens": ("max_new_tokens", int),
    "repetition_penalty": ("repetition_penalty", float),
    "seed": ("seed", lambda v: None if v.lower() in ("none", "off") else int(v)),
}


def chat(
    model: options.Model = options.DEFAULT_MODEL,
    mmproj: options.Mmproj = None,
    image: Annotated[
        Optional[list[str]],
        typer.Option("--image", "-i", help="A picture for the first message (a file or an http(s) URL); repeatable.", show_default=False),
    ] = None,
    backend: options.BackendName = "auto",
    max_tokens: options.MaxTokens = 512,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    seed: options.Seed = None,
    max_tiles: options.MaxTiles = None,
    max_pixels: options.MaxPixels = None,
    min_pixels: options.MinPixels = None,
    max_image_pixels: options.MaxImagePixels = None,
    threads: options.Threads = None,
    quiet: options.Quiet = False,
) -> None:
    """Talk with a model, with pictures; /help lists the commands."""
    state.quiet = quiet
    set_max_image_pixels(max_image_pixels)
    opts = sampling_options(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    images = [item.fetched() for item in inputs.expand(image or [], allow_stdin=False)]
    from vlmcli.chat import ChatSession

    pipe = load_pipeline(model, backend, max_tiles, min_pixels, max_pixels, mmproj=mmproj, images=bool(images), threads=threads)
    session = ChatSession(pipe, opts)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        notice(f"chatting with {model}; /help for commands, Ctrl-D to quit")
    for item in images:
        _add_image(session, item)
    if interactive:
        _interactive(session)
    else:
        _scripted(session, sys.stdin)


# ---------------------------------------------------------------------- the two front ends


def _scripted(session: ChatSession, lines) -> None:
    """One user message per line of stdin, replies on stdout; the first error ends the run."""
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if _is_command(line):
            if _run_command(session, line) == "exit":
                return
            continue
        reply = session.ask(line, on_text=write_result)
        write_result("\n")
        _report(reply, session)


def _interactive(session: ChatSession) -> None:
    prompt = _prompt_session()
    while True:
        try:
            if _interactive_turn(session, prompt) == "exit":
                return
        except KeyboardInterrupt:  # Ctrl-C at the prompt or between turns: a fresh prompt
            pass


def _interactive_turn(session: ChatSession, prompt) -> str | None:
    """Read one line and act on it; errors are said and the conversation goes on."""
    import torch

    try:
        line = prompt.prompt(PROMPT)
    except EOFError:  # Ctrl-D
        return "exit"
    if not line.strip():
        return None
    try:
        if _is_command(line):
            return _run_command(session, line)
        try:
            reply = session.ask(line, on_text=write_result)
        except KeyboardInterrupt:
            write_result("\n")
            err_console().print("[dim](reply stopped)[/]", highlight=False)
            return None
        write_result("\n")
        _report(reply, session)
    except KeyboardInterrupt:  # during a command (an image download, say)
        err_console().print("[dim](interrupted)[/]", highlight=False)
    except VlmError as e:
        if state.debug:
            err_console().print_exception()
        err_console().print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    except (MemoryError, torch.OutOfMemoryError):
        if state.debug:
            err_console().print_exception()
        err_console().print(
            "[bold red]error:[/] out of memory while generating; the conversation is kept "
            "(try /set max_tokens with a smaller value, or /clear)",
            highlight=False,
            soft_wrap=True,
        )
    except Exception as e:  # a bug: said, and the conversation goes on
        if state.debug:
            err_console().print_exception()
        else:
            err_console().print(
                f"[bold red]internal error:[/] {type(e).__name__}: {e} (run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
    return None


def _prompt_session():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        history = FileHistory(str(path))
    except OSError as e:
        notice(f"history not kept: cannot write {path} ({e.strerror or e})")
        history = InMemoryHistory()
    return PromptSession(
        history=history,
        key_bindings=key_bindings(),
        multiline=True,  # Enter is rebound below to send; the other bindings add lines
        prompt_continuation=CONTINUATION,
    )


def key_bindings():
    """Enter sends the message, unless the line ends in a backslash (which becomes a line
    break); Alt-Enter / Esc-Enter inserts a line break."""
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("enter")
    def _send(event):
        buffer = event.current_buffer
        before = buffer.document.text_before_cursor
        if before.endswith("\\") and not buffer.document.text_after_cursor.strip():
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    return bindings


def history_path() -> Path:
    """$XDG_STATE_HOME/vlm/history, else ~/.local/state/vlm/history."""
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state_home) / "vlm" / "history"


# ---------------------------------------------------------------------- slash commands


COMMANDS = ("/image", "/clear", "/save", "/set", "/help", "/exit", "/quit")


def _is_command(line: str) -> bool:
    word = line.strip().split(maxsplit=1)[0] if line.strip() else ""
    return word.startswith("/") and "/" not in word[1:]  # "/usr/bin/env?" is a message


def _run_command(session: ChatSession, line: str) -> str | None:
    """Do one slash command; returns "exit" for /exit. Feedback goes to stderr, so stdout
    holds only the replies."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        _say(HELP.format(names=", ".join(SETTINGS)))
    elif name == "/clear":
        session.clear()
        _confirm("conversation cleared")
    elif name == "/image":
        if not arg:
            raise UsageError("/image needs a file or an http(s) URL")
        for item in inputs.expand(_split(arg), allow_stdin=False):
            _add_image(session, item)
    elif name == "/save":
        if not arg:
            raise UsageError("/save needs a file name")
        names = _split(arg)
        if len(names) != 1:
            raise UsageError('/save takes one file name (quote one with spaces: /save "my chat.json")')
        path = session.save(names[0])
        _confirm(f"saved {len(session.messages)} messages to {path}")
    elif name == "/set":
        _set(session, arg)
    else:
        raise UsageError(f"unknown command {name} (commands: {', '.join(COMMANDS[:-1])})")
    return None


def _set(session: ChatSession, arg: str) -> None:
    if not arg:
        opts = session.opts
        for name, (field, _) in SETTINGS.items():
            _say(f"{name} = {getattr(opts, field)}")
        return
    parts = arg.split()
    if len(parts) != 2:
        raise UsageError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
    name, value = parts[0].replace("-", "_"), parts[1]
    if name not in SETTINGS:
        raise UsageError(f"unknown option '{parts[0]}' (options: {', '.join(SETTINGS)})")
    field, parse = SETTINGS[name]
    try:
        parsed = parse(value)
    except ValueError:
        raise UsageError(f"'{value}' is not a valid value for {name}") from None
    current = {f: getattr(session.opts, f) for f in session.opts.__dataclass_fields__}
    try:
        session.opts = sampling_options(**{**current, field: parsed})
    except UsageError as e:  # "max_new_tokens must be ..." in the words the user typed: max_tokens
        raise UsageError(e.message.replace(field, name)) from None
    _confirm(f"{name} = {parsed}")


def _add_image(session: ChatSession, item: inputs.ImageInput) -> None:
    from vlmcli.preprocess import probe_image, tiny_image_note

    item = item.fetched()
    tiny = tiny_image_note(probe_image(item.source, name=item.name))
    for note in ([tiny] if tiny else []) + session.add_image(item):
        notice(f"{item.name}: {note}")
    n = len(session.pending_images)
    _confirm(f"added {item.name} ({n} picture{'s' if n > 1 else ''} for your next message)")


def _split(arg: str) -> list[str]:
    """Arguments with shell quoting, for paths with spaces: /image "my photo.jpg"."""
    try:
        return shlex.split(arg)
    except ValueError as e:
        raise UsageError(f"cannot read the arguments: {e}") from None


# ---------------------------------------------------------------------- output


def _report(reply: Reply, session: ChatSession) -> None:
    if reply.finish_reason == "context":
        err_console().print(
            f"[bold yellow]warning:[/] the reply stopped because the conversation filled the model's "
            f"context ({session.context_length} tokens); /clear starts a new one",
            highlight=False,
            soft_wrap=True,
        )
    elif reply.finish_reason == "length":
        notice(f"(reply cut at {session.opts.max_new_tokens} tokens; /set max_tokens N for longer ones)")


def _confirm(message: str) -> None:
    """That a command did what it was asked: a notice, so -q silences it (what /help and a
    bare /set were asked to show is said with _say)."""
    if not state.quiet:
        _say(message)


def _say(message: str) -> None:
    err_console().print(message, highlight=False, markup=False, soft_wrap=True)


__all__ = ["chat", "history_path", "key_bindings"]
