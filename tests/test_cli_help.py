"""Help that reads well, usage errors as git and cargo write them, and -q that means quiet."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from vlmcli.cli import main
from vlmcli.cli.options import DEFAULT_MODEL

COMMANDS = ["describe", "chat", "convert", "info", "bench"]


def vlm(*args, env=None):
    base = {k: v for k, v in os.environ.items() if k not in ("VLM_MODEL", "VLM_BACKEND", "FORCE_COLOR")}
    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *map(str, args)], capture_output=True, text=True, env={**base, **(env or {})}
    )


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns(command):
    proc = vlm(command, "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "<bool>" not in text and "<str>" not in text and "<list" not in text  # flags and arguments: no type
    assert not re.search(r"\{[A-Za-z]", text)  # IMAGE..., not {IMAGE}...
    assert "…" not in text  # nothing cut
    assert max(len(line) for line in text.splitlines()) <= 80
    if command in ("describe", "chat", "bench", "info"):
        # the default model's id whole, on one line, where -m is described
        assert any(line.strip(" │").endswith(DEFAULT_MODEL) for line in text.splitlines()), text


def test_usage_lines():
    assert re.search(r"Usage: vlm describe \[OPTIONS\] IMAGE\.\.\. *\n", vlm("describe", "--help", env={"COLUMNS": "80"}).stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["describe", "--frobnicate", "x.png"], "no such option: --frobnicate"),
        (["describe"], "missing argument 'IMAGE'"),
        (["describe", "x.png", "--max-tokens", "many"], "invalid value for '--max-tokens': Input should be a valid integer, unable to parse string as an integer"),
        (["chat", "--temperature"], "option '--temperature' requires an argument"),
        (["frobnicate"], "no such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_and_a_hint(capsys, args, message):
    command = "vlm" if args[0] == "frobnicate" else f"vlm {args[0]}"
    assert run(capsys, *args) == (2, "", f"error: {message}\nTry '{command} --help' for help.\n")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pic") / "square.png"
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((220, 30, 30), (16, 16, 48, 48))
    img.save(path)
    return path


def chat(capsys, monkeypatch, lines, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    return run(capsys, "chat", *args)


def test_set_says_the_users_option_name(capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, "/set max_tokens -1\n", "-m", "demo", "-q")
    assert (code, out, err) == (2, "", "error: max_tokens must be at least 1\n")


def test_quiet_chat_says_nothing(capsys, monkeypatch, picture, tmp_path):
    script = f"/set max_tokens 6\n/image {picture}\nHow many shapes are there?\n/save {tmp_path / 'c.json'}\n/clear\n"
    code, out, err = chat(capsys, monkeypatch, script, "-m", "demo", "-q")
    assert (code, err) == (0, "") and out.strip()
    assert (tmp_path / "c.json").exists()
    # without -q the same script says what each command did
    code, out, err = chat(capsys, monkeypatch, script, "-m", "demo")
    assert code == 0
    assert err == (
        "max_tokens = 6\n"
        f"added {picture} (1 picture for your next message)\n"
        f"saved 2 messages to {tmp_path / 'c.json'}\n"
        "conversation cleared\n"
    )
    # what is asked for is still shown under -q
    code, out, err = chat(capsys, monkeypatch, "/set\n", "-m", "demo", "-q")
    assert code == 0 and err.startswith("temperature = 0.0\n")


def test_quiet_chat_with_a_tiny_picture(capsys, monkeypatch, tmp_path):
    tiny = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(tiny)
    code, out, err = chat(capsys, monkeypatch, "/clear\n", "-m", "demo", "-i", tiny)
    assert code == 0 and err.startswith(f"{tiny}: the image is only 1x1 pixels")
    assert chat(capsys, monkeypatch, "/clear\n", "-m", "demo", "-i", tiny, "-q") == (0, "", "")
