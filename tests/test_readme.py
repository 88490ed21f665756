"""The README's examples a reader can run: the files they name exist, the demo's size is
the one `vlm info` prints, and the demo's shown output is what vlm prints."""

from __future__ import annotations

import re
from pathlib import Path

from vlmcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    return [line[2:] for line in README.splitlines() if line.startswith("$ vlm ") or line.startswith("$ cat ")]


def test_every_file_an_example_command_names_exists():
    named = set()
    for command in _commands():
        named.update(re.findall(r"\b(examples/[\w.*-]+)", command))
    assert named >= {"examples/shapes.png"}
    for pattern in named:
        assert list(ROOT.glob(pattern.strip("'"))), f"README names {pattern}, which is not in the repository"
    # models: the demo, hub ids, or the fixture whose build the README shows
    models = {m for command in _commands() for m in re.findall(r"-m (\S+)", command)}
    local = {m for m in models if m.startswith(("./", "~", "/"))}
    assert local <= {"./smollm2-llava", "~/.cache/vlmcli-tests/smollm2-llava-v2"}
    assert ".venv/bin/python -m tests.checkpoints smollm2-llava" in README


def test_demo_size_is_what_vlm_info_prints(capsys):
    assert main(["info", "-m", "demo"]) == 0
    printed = re.search(r"checkpoint fp32, ([\d.]+ MB) in 1 file", capsys.readouterr().out).group(1)
    assert f"{printed} of safetensors" in README


def test_demo_output_shown_is_what_vlm_prints(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["describe", "examples/shapes.png", "-m", "demo", "-q"]) == 0
    text = capsys.readouterr().out.strip()
    assert text == "a red circle, a yellow square and a blue triangle"
    assert f"==> examples/shapes.png <==\n{text}\n" in README
