"""The `vlm` command: a Typer app whose commands are thin wrappers over the library.

`main()` is the console script. It owns the contract's exit codes: 0 ok, 1 failure,
2 usage, 130 interrupted (143 terminated); one line on stderr for every error, a traceback only with --debug.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.markup import escape  # messages name files, and `[...]` in a name is not markup

from vlmcli import __version__
from vlmcli.cli import batch, bench, chat, common, convert, describe, help, info, serve
from vlmcli.cli.console import err_console, state
from vlmcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED, VlmError

help.install()
app = typer.Typer(
    name="vlm",
    help="Run LLaVA-style vision-language models on your own machine.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"vlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", envvar="VLM_DEBUG", help="Show tracebacks for errors. [env: VLM_DEBUG]"
    ),
) -> None:
    state.debug = debug


app.command("describe")(describe.describe)
app.command("batch")(batch.batch)
app.command("chat")(chat.chat)
app.command("convert")(convert.convert)
app.command("info")(info.info)
app.command("bench")(bench.bench)
app.command("serve")(serve.serve)


def _torch_oom() -> type[BaseException]:
    torch = sys.modules.get("torch")  # not imported: the command cannot have run out of torch's memory
    return getattr(torch, "OutOfMemoryError", MemoryError)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        # a command's settings end with it: --max-image-pixels, and -q / --debug (which
        # library code called later in the same process, as tests do, must not inherit)
        common.restore_max_image_pixels()
        state.__init__()


def _main(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="vlm", standalone_mode=False)
        if result == EXIT_INTERRUPTED:  # Typer's Click returns Ctrl-C in a command as 130
            err_console().print("interrupted")
        if isinstance(result, int):  # --version, --help: an exit code, not a result
            return result
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # bad options, missing arguments (Typer's own Click)
        args = sys.argv[1:] if argv is None else argv
        named = next((a for a in args if not a.startswith("-")), None)
        help.show_usage_error(e, sys.stderr, "vlm" + (f" {named}" if named in command.commands else ""))
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err_console().print("interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        err_console().print("terminated")
        return EXIT_TERMINATED
    except VlmError as e:
        if state.debug:
            err_console().print_exception()
        err_console().print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        return e.exit_code
    except (MemoryError, _torch_oom()):
        if state.debug:
            err_console().print_exception()
        hint = "try -b int4 or a smaller model" if state.phase == "loading the model" else "try fewer --max-tokens, fewer images or -b int4"
        err_console().print(
            f"[bold red]error:[/] out of memory while {state.phase} ({hint})", highlight=False, soft_wrap=True
        )
        return EXIT_FAILURE
    except BrokenPipeError:  # `vlm describe ... | head`: the reader left; not our failure
        sys.stderr.close()
        return 0
    except Exception as e:  # a bug: say so in one line, the traceback under --debug
        if state.debug:
            err_console().print_exception()
        else:
            err_console().print(
                f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))} (run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
        return EXIT_FAILURE
    return 0


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that cleanups run on the way out (convert's
    temporary folder, bench's child process) as they do for Ctrl-C."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    with sigterm_raises():
        code = main()
    sys.exit(code)
