"""A fast start: `vlm --version`, `--help` and shell completion never import torch (it takes
seconds to import); the commands import it when they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# main() in a fresh interpreter; then which heavy modules it pulled in
# (at exit: shell completion ends the process from inside main())
_PROBE = """
import atexit, json, sys
result = {"code": None}

@atexit.register
def report():
    result["heavy"] = [m for m in ("torch", "safetensors", "tokenizers", "huggingface_hub") if m in sys.modules]
    print(json.dumps(result), file=sys.__stderr__)

from vlmcli.cli import main
result["code"] = main(json.loads(sys.argv[1]))
"""


def probe(args, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], [], ["describe", "--help"], ["chat", "--help"], ["convert", "--help"],
     ["info", "--help"], ["bench", "--help"], ["--show-completion", "bash"]],
)
def test_version_and_help_do_not_import_torch(args):
    # Typer takes a shell name after --show-completion only with its shell detection off;
    # with it on, the shell is found among the parent processes, which pytest may not have
    got = probe(args, {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    # bare `vlm` prints the help with exit 2; --show-completion exits from inside main()
    assert got["heavy"] == [] and got["code"] == {(): 2, ("--show-completion", "bash"): None}.get(tuple(args), 0)


def test_shell_completion_does_not_import_torch():
    env = {"_VLM_COMPLETE": "complete_bash", "COMP_WORDS": "vlm describe --max", "COMP_CWORD": "2"}
    assert probe([], env) == {"code": None, "heavy": []}  # completion exits from inside main()


def test_usage_errors_do_not_import_torch():
    assert probe(["describe", "--frobnicate", "x.png"]) == {"code": 2, "heavy": []}


def test_a_command_still_imports_it_when_it_runs(tmp_path):
    # a model-running command gets as far as the model (which does not exist) with torch loaded
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    got = probe(["describe", str(image), "-m", str(tmp_path / "no-model")])
    assert got["code"] == 2 and "torch" in got["heavy"]
