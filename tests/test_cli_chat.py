"""`vlm chat` scripted through stdin (one message per line), its slash commands, and the
prompt's key bindings. The real-terminal test is tests/test_chat_tmux.py."""

from __future__ import annotations

import io
import json
import sys

import pytest

from vlmcli.chat import ChatSession
from vlmcli.cli import main
from vlmcli.cli.chat import history_path, key_bindings
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline


def chat(capsys, monkeypatch, lines, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = main(["chat", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_scripted_chat_with_a_real_model(capsys, monkeypatch, smollm2_llava):
    code, out, err = chat(
        capsys, monkeypatch, "What is the capital of France?\n\nAnd of Germany?\n", "-m", smollm2_llava, "-q"
    )
    assert (code, out, err) == (0, "The capital of France is Paris.\nThe capital of Germany is Berlin.\n", "")


def test_commands_in_a_script(capsys, monkeypatch, llava_ckpt, test_image, tmp_path):
    script = (
        "/set max_tokens 6\n"
        "/set top-k 5\n"
        f"/image {test_image}\n"
        "What is in the picture?\n"
        f"/save {tmp_path / 'chat.json'}\n"
        "/exit\n"
        "this line is never read\n"
    )
    code, out, err = chat(capsys, monkeypatch, script, "-m", llava_ckpt)
    assert code == 0, err
    session = ChatSession(Pipeline.load(str(llava_ckpt), "cpu"), SamplingOptions(max_new_tokens=6, top_k=5))
    session.add_image(test_image)
    expected = session.ask("What is in the picture?")
    assert out == expected.text + "\n"
    assert err == (
        "max_tokens = 6\n"
        "top_k = 5\n"
        f"added {test_image} (1 picture for your next message)\n"
        "(reply cut at 6 tokens; /set max_tokens N for longer ones)\n"
        f"saved 2 messages to {tmp_path / 'chat.json'}\n"
    )
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["options"]["top_k"] == 5
    assert saved["messages"][0]["content"] == [
        {"type": "image", "image": str(test_image)},
        {"type": "text", "text": "What is in the picture?"},
    ]
    assert saved["messages"][1]["content"] == [{"type": "text", "text": expected.text}]


def test_images_from_the_command_line_and_help(capsys, monkeypatch, llava_ckpt, make_test_image):
    a, b = make_test_image(seed=1), make_test_image(seed=2)
    code, out, err = chat(capsys, monkeypatch, "/help\n/set\n/clear\n", "-m", llava_ckpt, "-i", a, "-i", b, "-t", 0.5)
    assert (code, out) == (0, "")
    assert f"added {a} (1 picture for your next message)\nadded {b} (2 pictures for your next message)\n" in err
    assert "Alt-Enter (or Esc, Enter) starts a new line; so does a line ending in \\" in err
    assert "/set NAME VALUE    change a sampling option: temperature, top_p, top_k, max_tokens, repetition_penalty, seed" in err
    assert "temperature = 0.5\ntop_p = 1.0\ntop_k = 0\nmax_tokens = 512\nrepetition_penalty = 1.0\nseed = None\n" in err
    assert err.endswith("conversation cleared\n")


@pytest.mark.parametrize(
    "script, code, message",
    [
        ("/frobnicate\n", 2, "error: unknown command /frobnicate (commands: /image, /clear, /save, /set, /help, /exit)"),
        ("/set temperature warm\n", 2, "error: 'warm' is not a valid value for temperature"),
        ("/set temperature -1\n", 2, "error: temperature must be >= 0"),
        ("/set colour red\n", 2, "error: unknown option 'colour' (options: temperature, top_p, top_k, max_tokens"),
        ("/image\n", 2, "error: /image needs a file or an http(s) URL"),
        ("/image {missing}\n", 1, "error: cannot read image '{missing}': no such file"),
        ("/save a b\n", 2, "error: /save takes one file name"),
        ("{long}\n", 1, "error: the conversation no longer fits the model's context: the prompt is"),
    ],
)
def test_script_errors_end_the_run(capsys, monkeypatch, llava_ckpt, tmp_path, script, code, message):
    fill = {"missing": tmp_path / "missing.png", "long": "The quick brown fox jumps over the lazy dog. " * 60}
    got, out, err = chat(capsys, monkeypatch, script.format(**fill) + "never asked\n", "-m", llava_ckpt, "-q")
    assert (got, out) == (code, "")
    assert err.startswith(message.format(**fill)) and err.count("\n") == 1


def test_bad_images_fail_before_the_model_loads(capsys, monkeypatch, tmp_path):
    code, out, err = chat(capsys, monkeypatch, "", "-m", tmp_path / "no-model", "-i", tmp_path / "x.png")
    assert (code, out, err) == (1, "", f"error: cannot read image '{tmp_path / 'x.png'}': no such file\n")
    code, out, err = chat(capsys, monkeypatch, "", "-m", tmp_path / "no-model", "-i", "-")
    assert (code, out, err) == (2, "", "error: '-' (an image on stdin) cannot be used here\n")


def test_a_message_that_looks_like_a_path_is_a_message(capsys, monkeypatch, llava_ckpt):
    code, out, err = chat(capsys, monkeypatch, "/usr/bin/env is what?\n", "-m", llava_ckpt, "--max-tokens", 2, "-q")
    assert code == 0 and out.count("\n") == 1 and err == ""


# ------------------------------------------------------------------ the interactive prompt


def _prompt(keys: str) -> str:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        session = PromptSession(input=pipe, output=DummyOutput(), key_bindings=key_bindings(), multiline=True)
        return session.prompt("> ")


def test_enter_sends_and_other_keys_add_lines():
    assert _prompt("hello\r") == "hello"
    assert _prompt("one\\\rtwo\r") == "one\ntwo"  # a trailing backslash continues the message
    assert _prompt("one\x1b\rtwo\r") == "one\ntwo"  # Alt-Enter / Esc, Enter
    assert _prompt("a\\b\r") == "a\\b"  # a backslash elsewhere is text


def test_history_file_location(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert history_path() == tmp_path / "state" / "vlm" / "history"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == tmp_path / ".local" / "state" / "vlm" / "history"


def test_the_interactive_loop_survives_errors(capsys, monkeypatch):
    """The loop itself, with a scripted prompt: Ctrl-C during a reply, an error and a bug
    each leave the chat running; Ctrl-D ends it."""
    from vlmcli.cli import chat as chat_cli
    from vlmcli.errors import ImageError

    class Prompt:
        lines = iter(["first", "", "second", "third", "fourth", "oom", "fifth"])

        def prompt(self, _):
            line = next(self.lines, None)
            if line is None:
                raise EOFError
            if line == "second":
                raise KeyboardInterrupt  # Ctrl-C at the prompt
            return line

    class Session:
        asked = []

        def ask(self, text, on_text):
            self.asked.append(text)
            if text == "first":
                on_text("Once upon")
                raise KeyboardInterrupt
            if text == "third":
                raise ImageError("cannot read image 'x': no such file")
            if text == "fourth":
                raise RuntimeError("boom")
            if text == "oom":
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory")
            on_text("fine")
            return type("Reply", (), {"finish_reason": "stop"})()

    monkeypatch.setattr(chat_cli, "_prompt_session", Prompt)
    monkeypatch.setattr(chat_cli.state, "debug", False)
    chat_cli._interactive(Session())
    out, err = capsys.readouterr()
    assert Session.asked == ["first", "third", "fourth", "oom", "fifth"]
    assert out == "Once upon\nfine\n"
    assert err == (
        "(reply stopped)\n"
        "error: cannot read image 'x': no such file\n"
        "internal error: RuntimeError: boom (run with --debug for the traceback)\n"
        "error: out of memory while generating; the conversation is kept (try /set max_tokens with a smaller value, or /clear)\n"
    )
