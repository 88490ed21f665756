"""Help and usage errors that read well.

Typer's help shows a type for every parameter (`<bool>` beside each flag, `<list[str]>`
beside IMAGE) and braces around required arguments in the usage line (`{IMAGE}...`); a
usage error prints the usage line, a hint and a capitalised "Error:" over three lines.
Here: flags and arguments carry no type, arguments are written as their metavar (`IMAGE...`,
`[SOURCE] OUTPUT`), and a usage error is one line and a hint, as git and cargo do:

    error: no such option: --frobnicate
    Try 'vlm describe --help' for help.
"""

from __future__ import annotations

from typing import IO

from typer import core


def install() -> None:
    """Patch Typer's help rendering (the classes it builds every command's parameters from)."""
    option, argument = core.TyperOption, core.TyperArgument
    if getattr(option, "_vlm_help", False):
        return
    option_type = option.display_type_rich

    def display_type_rich(self, ctx):
        if self.is_flag and self.metavar is None:  # --force, not --force <bool>
            return None
        return option_type(self, ctx)

    def usage_display_name(self) -> str:
        name = self.display_name_raw
        if self.metavar is not None and " " in self.metavar:  # written out whole: "[SOURCE] OUTPUT"
            return self.metavar
        if not self.required:
            name = f"[{name}]"
        if self.nargs != 1:
            name += "..."
        return name

    def named_type(self, ctx):  # --prompt PROMPT, not --prompt <str>
        shown = display_type_rich(self, ctx)
        return self.name.upper() if shown is not None and shown.startswith("<") else shown

    option.display_type_rich = named_type
    # "N", not "N [x>=1]": the help says what a value means, a bad one is refused with the
    # range, and the column left to the help is then wide enough for the default model id
    option._get_number_range_help_str = lambda self: None
    option._vlm_help = True
    # an argument's name says what it is: IMAGE, not IMAGE <list[str]>
    argument.display_type_rich = lambda self, ctx: None
    if hasattr(argument, "_usage_display_name"):
        argument._usage_display_name = usage_display_name
    for command in (core.TyperCommand, core.TyperGroup):
        command.format_help = _with_folding_help(command.format_help)


def _with_folding_help(format_help):
    """Typer lays out an option's help, env var and default as Rich Columns, which cut a word
    wider than the column with an ellipsis (the default model's id at 80 columns). Stacked
    lines of Text fold it instead. Patched when help is shown: rich_utils takes ~70 ms to import."""

    def patched(self, ctx, formatter):
        from rich.console import Group
        from rich.text import Text
        from typer import rich_utils

        original = getattr(rich_utils, "_get_parameter_help", None)
        if original is not None and not getattr(original, "_vlm_help", False):

            def parameter_help(**kwargs):
                cells = original(**kwargs)
                items = list(getattr(cells, "renderables", [cells]))
                for item in items:
                    if isinstance(item, Text):
                        item.overflow = "fold"
                return Group(*items)

            parameter_help._vlm_help = True
            rich_utils._get_parameter_help = parameter_help
        return format_help(self, ctx, formatter)

    return patched


def show_usage_error(error, file: IO[str], command_path: str) -> None:
    """Typer's (Click's) usage error as one line, then where to read more. `command_path`
    ("vlm describe") is for the errors Click raises before it has a context to name it."""
    message = error.format_message().strip().rstrip(".")
    message = message[:1].lower() + message[1:]
    file.write(f"error: {message}\n")
    if hasattr(error, "ctx"):  # a usage error, not another kind of Click exception
        ctx = error.ctx
        file.write(f"Try '{ctx.command_path if ctx is not None else command_path} --help' for help.\n")
