"""User-facing errors.

Every failure a user can cause or fix (a bad path, a missing file, an unsupported model)
raises a VlmError. The CLI prints its message on one line and exits with its code; any
other exception is a bug and shows a traceback only under --debug.
"""

from __future__ import annotations

# Exit codes of the CLI contract.
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a terminated process


class VlmError(Exception):
    """An error whose message is meant for the user, with the exit code to use."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(VlmError):
    """The command line asked for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class CheckpointError(VlmError):
    """A model folder is missing files, holds something we refuse to read, or is corrupt."""


class ImageError(VlmError):
    """An input image cannot be read. `kind` says why, in a word a script can test (it is
    `error_type` in `vlm describe --json`'s error records): missing, too_large, undecodable,
    fetch_failed or unreadable."""

    def __init__(self, message: str, hint: str | None = None, kind: str = "unreadable"):
        super().__init__(message, hint)
        self.kind = kind


class UnsupportedModelError(VlmError):
    """The checkpoint's model_type (or a part of it) is not one we implement."""


class ContextLengthError(VlmError):
    """The prompt (with its image tokens) does not fit the model's context."""
