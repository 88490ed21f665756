"""`vlm chat` in a real terminal: tmux runs it in a pseudo-terminal, the test types into it
(send-keys) and reads the screen (capture-pane). A question, a picture added mid-chat,
Ctrl-C in the middle of a reply, /save, then /exit.

Skipped when tmux is not installed; CI installs it (.ci/run)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (CI installs it in .ci/run)")

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180  # per step; generous, the CI machine may be slow and busy


class Terminal:
    """One tmux session on a private server socket."""

    def __init__(self, socket: Path, command: str, width: int = 220, height: int = 50):
        self.tmux = ["tmux", "-S", str(socket)]
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), "-c", str(REPO), command],
            check=True,
        )
        subprocess.run([*self.tmux, "set-option", "-g", "history-limit", "10000"], check=True)

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", *(["-l"] if literal else []), *keys], check=True)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)
        self.keys("Enter")

    def screen(self) -> str:
        out = subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", "t"], capture_output=True, text=True, check=True
        )
        return out.stdout

    def wait(self, predicate, what: str) -> str:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def wait_for(self, needle: str) -> str:
        return self.wait(lambda text: needle in text, repr(needle))

    def wait_for_prompt(self, count: int) -> str:
        """Until the `count`-th prompt is on screen, empty and last."""

        def ready(text):
            lines = [line.rstrip() for line in text.splitlines() if line.strip()]
            prompts = [line for line in lines if line == ">" or line.startswith("> ")]
            return len(prompts) >= count and lines[-1] == ">"

        return self.wait(ready, f"prompt #{count}")

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


@pytest.mark.slow
def test_chat_in_a_terminal(smollm2_llava, test_image, tmp_path):
    state = tmp_path / "state"
    transcript = tmp_path / "chat.json"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "XDG_STATE_HOME": str(state),
        "HF_HUB_OFFLINE": "1",
    }
    command = " ".join(
        ["env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.quote(sys.executable), "-m", "vlmcli", "chat",
         "-m", shlex.quote(str(smollm2_llava)), "--max-tokens", "40"]
    )
    term = Terminal(tmp_path / "tmux.sock", f"{command}; echo EXIT=$?; sleep 600")
    try:
        term.wait_for("/help for commands, Ctrl-D to quit")
        term.wait_for_prompt(1)

        term.type("What is the capital of France?")
        screen = term.wait_for_prompt(2)
        assert "> What is the capital of France?\nThe capital of France is Paris.\n" in screen

        term.type(f"/image {test_image}")
        term.wait_for(f"added {test_image} (1 picture for your next message)")
        term.wait_for_prompt(3)
        term.type("What is in this picture?")
        term.wait_for_prompt(4)

        term.type("/set max_tokens 400")
        term.wait_for("max_tokens = 400")
        term.wait_for_prompt(5)
        term.type("Write a long story about a dragon.")
        # wait until the reply is streaming, then interrupt it
        question = "> Write a long story about a dragon.\n"
        term.wait(
            lambda text: question in text and len(text.split(question, 1)[1].split("\n", 1)[0]) > 20,
            "the story to start",
        )
        term.keys("C-c")
        screen = term.wait_for_prompt(6)
        assert "(reply stopped)" in screen

        term.type(f"/save {transcript}")
        term.wait_for(f"saved 6 messages to {transcript}")
        term.wait_for_prompt(7)
        term.type("/exit")
        term.wait_for("EXIT=0")
    finally:
        term.close()

    saved = json.loads(transcript.read_text())
    texts = [[part.get("text", part.get("image")) for part in m["content"]] for m in saved["messages"]]
    assert texts[:2] == [["What is the capital of France?"], ["The capital of France is Paris."]]
    assert texts[2] == [str(test_image), "What is in this picture?"]
    assert texts[4] == ["Write a long story about a dragon."]
    story = texts[5][0]
    assert story and story in screen  # the partial reply is kept, as it was shown
    assert saved["options"]["max_new_tokens"] == 400
    history = (state / "vlm" / "history").read_text()
    for line in ["What is the capital of France?", f"/image {test_image}", "/exit"]:
        assert f"\n+{line}\n" in history + "\n"


def test_multi_line_input_and_ctrl_d(llava_ckpt, tmp_path):
    env = f"env PYTHONPATH={shlex.quote(str(REPO))} XDG_STATE_HOME={shlex.quote(str(tmp_path / 'state'))}"
    command = f"{env} {shlex.quote(sys.executable)} -m vlmcli chat -m {shlex.quote(str(llava_ckpt))} --max-tokens 3 -q"
    term = Terminal(tmp_path / "tmux.sock", f"{command}; echo EXIT=$?; sleep 600")
    try:
        term.wait_for_prompt(1)
        term.keys("one\\", "Enter")  # a trailing backslash: a new line, not sent
        term.keys("two", "Escape", "Enter")  # Esc, Enter (what Alt-Enter sends): a new line
        term.type("three")
        term.wait_for_prompt(2)
        term.keys("x", "C-c")  # at the prompt: the line is dropped, a fresh prompt
        term.wait(lambda text: [line.rstrip() for line in text.splitlines() if line.strip()][-2:] == ["> x", ">"], "a fresh prompt")
        term.keys("C-d")  # Ctrl-D on an empty line: goodbye
        screen = term.wait_for("EXIT=0")
    finally:
        term.close()
    assert "> one\n. two\n. three\n" in screen
    history = (tmp_path / "state" / "vlm" / "history").read_text()
    assert "\n+one\n+two\n+three\n" in history
