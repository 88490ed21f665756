"""`vlm describe` in the terminal: many inputs, progress, environment variables, colour,
completion, and the default model."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from vlmcli.cli import main
from vlmcli.cli.options import DEFAULT_MODEL
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

PROMPT = "Describe this image."


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def vlm(*args, env=None, **kwargs):
    """The CLI in a child process: what a shell user gets (settings of the caller's own
    environment that would change the output are dropped)."""
    base = {k: v for k, v in os.environ.items() if k not in ("VLM_MODEL", "VLM_BACKEND", "NO_COLOR", "FORCE_COLOR")}
    return subprocess.run(
        [sys.executable, "-m", "vlmcli", *map(str, args)], capture_output=True, env={**base, **(env or {})}, **kwargs
    )


@pytest.fixture(scope="module")
def pipe(llava_ckpt):
    return Pipeline.load(str(llava_ckpt), "cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, make_test_image):
    folder = tmp_path_factory.mktemp("pics")
    for name, seed in [("b.png", 2), ("a.png", 1), ("c.jpg", 3)]:
        (folder / name).write_bytes(make_test_image(seed=seed).read_bytes())
    (folder / "readme.txt").write_text("not a picture")
    return folder


def expected_text(pipe, image, max_tokens=4):
    return pipe.describe([image], PROMPT, SamplingOptions(max_new_tokens=max_tokens)).text


def test_folder_and_glob(capsys, llava_ckpt, pipe, folder):
    # a folder gives its images sorted; a glob a shell left alone is expanded here
    code, out, err = run(capsys, "describe", folder, f"{folder}/b.*", "-m", llava_ckpt, "--max-tokens", 4)
    assert code == 0, err
    names = ["a.png", "b.png", "c.jpg", "b.png"]
    assert out == "\n".join(
        f"==> {folder}/{name} <==\n{expected_text(pipe, folder / name)}\n" for name in names
    )


def test_image_bytes_on_stdin(capsys, monkeypatch, llava_ckpt, pipe, test_image):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(test_image.read_bytes())))
    code, out, err = run(capsys, "describe", "-", "-m", llava_ckpt, "--max-tokens", 4, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["image"] == "-" and record["text"] == expected_text(pipe, test_image)


def test_url(capsys, http_server, llava_ckpt, pipe, test_image):
    base, routes = http_server
    data = test_image.read_bytes()

    def serve(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    routes["/cat.png"] = serve
    code, out, err = run(capsys, "describe", f"{base}/cat.png", test_image, "-m", llava_ckpt, "--max-tokens", 4, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [f"{base}/cat.png", str(test_image)]
    assert records[0]["text"] == records[1]["text"] == expected_text(pipe, test_image)


def test_inputs_fail_before_the_model_loads(capsys, http_server, test_image, tmp_path):
    base, _ = http_server
    # the model does not exist either: the image error comes first (then the other image
    # goes on, to the model's error)
    code, out, err = run(capsys, "describe", test_image, f"{base}/nothing.png", "-m", tmp_path / "no-model")
    assert (code, out) == (2, "")
    first, second = err.splitlines()
    assert first == f"error: cannot fetch '{base}/nothing.png': HTTP 404 Not Found"
    assert second.startswith(f"error: model '{tmp_path / 'no-model'}'")
    code, out, err = run(capsys, "describe", f"{base}/nothing.png", "-m", tmp_path / "no-model")
    assert (code, out, err) == (1, "", f"error: cannot fetch '{base}/nothing.png': HTTP 404 Not Found\n")
    code, out, err = run(capsys, "describe", f"{tmp_path}/*.png", "-m", tmp_path / "no-model")
    assert (code, out, err) == (1, "", f"error: no files match '{tmp_path}/*.png'\n")


def test_environment_variables(capsys, monkeypatch, llava_ckpt, test_image):
    monkeypatch.setenv("VLM_MODEL", str(llava_ckpt))
    monkeypatch.setenv("VLM_BACKEND", "cpu")
    code, out, err = run(capsys, "describe", test_image, "--max-tokens", 2, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["model"] == str(llava_ckpt) and record["backend"] == "cpu"
    monkeypatch.setenv("VLM_BACKEND", "tpu")
    code, out, err = run(capsys, "describe", test_image)
    assert (code, out) == (2, "") and "unknown backend 'tpu'" in err


@pytest.mark.parametrize("command", ["describe", "chat"])
def test_help_shows_environment_variables(command):
    proc = vlm(command, "--help", env={"COLUMNS": "200"}, text=True)
    assert proc.returncode == 0
    assert "[env var: VLM_MODEL]" in proc.stdout and "[env var: VLM_BACKEND]" in proc.stdout
    assert DEFAULT_MODEL in proc.stdout


def test_progress_only_on_a_terminal(llava_ckpt, folder):
    args = ["describe", folder, "-m", llava_ckpt, "--max-tokens", 2]
    # stderr not a terminal: nothing but results
    plain = vlm(*args, text=True)
    assert plain.returncode == 0 and plain.stderr == ""
    # Rich takes FORCE_COLOR as "this is a terminal": the bars for loading and for the
    # batch appear on stderr, with an ETA, and stdout is unchanged
    shown = vlm(*args, env={"FORCE_COLOR": "1"}, text=True)
    assert shown.returncode == 0 and shown.stdout == plain.stdout
    assert "loading model" in shown.stderr and "describing" in shown.stderr
    assert re.search(r"\d+%.*\d:\d\d:\d\d", shown.stderr)
    quiet = vlm(*args, "-q", env={"FORCE_COLOR": "1"}, text=True)
    assert quiet.stderr == "" and quiet.stdout == plain.stdout


def test_no_color(tmp_path):
    args = ["describe", tmp_path / "x.png", "-m", tmp_path]
    coloured = vlm(*args, env={"FORCE_COLOR": "1"}, text=True)
    assert "\x1b[1;31merror:" in coloured.stderr
    plain = vlm(*args, env={"FORCE_COLOR": "1", "NO_COLOR": "1"}, text=True)
    assert plain.returncode == 1
    assert not re.search(r"\x1b\[[0-9;]*3[0-9]m", plain.stderr)  # no colour codes (bold may stay)
    text = re.sub(r"\x1b\[[0-9;]*m", "", plain.stderr)
    assert text == f"error: cannot read image '{tmp_path / 'x.png'}': no such file\n"


def test_brackets_in_a_file_name_are_not_markup(tmp_path):
    """Errors and notices are printed through Rich: a name like photo[1].png keeps its brackets."""
    proc = vlm("describe", tmp_path / "photo[1].png", "-m", "demo", text=True)  # missing: read as a glob
    assert (proc.returncode, proc.stderr) == (1, f"error: no files match '{tmp_path / 'photo[1].png'}'\n")


def test_version():
    proc = vlm("--version", text=True)
    assert proc.returncode == 0 and re.fullmatch(r"vlm \d+\.\d+\.\d+\S*\n", proc.stdout)


def test_shell_completion():
    env = {"_VLM_COMPLETE": "complete_bash", "COMP_WORDS": "vlm ch", "COMP_CWORD": "1"}
    assert vlm(env=env, text=True).stdout.split() == ["chat"]
    env = {"_VLM_COMPLETE": "complete_bash", "COMP_WORDS": "vlm describe --max-to", "COMP_CWORD": "2"}
    assert vlm(env=env, text=True).stdout.split() == ["--max-tokens"]
    # `--show-completion` prints the script for the shell it finds among its parent processes
    # (Typer's shellingham): run it from a bash, as a user would, whatever started pytest
    script = subprocess.run(
        ["bash", "-c", '"$0" -m vlmcli --show-completion; exit $?', sys.executable], capture_output=True, text=True
    )
    assert script.returncode == 0 and "complete -o default -F _vlm_completion vlm" in script.stdout, script.stderr


def test_default_model_offline_and_not_cached(test_image, tmp_path):
    proc = vlm("describe", test_image, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (
        f"error: model '{DEFAULT_MODEL}' is not in the cache ({tmp_path / 'hf' / 'hub'}) and HF_HUB_OFFLINE is "
        "set (use -m demo for the bundled model or -m PATH for a local folder)\n"
    )


def test_tracebacks_only_with_debug(capsys, monkeypatch, llava_ckpt, test_image):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Pipeline, "describe", broken)
    code, out, err = run(capsys, "describe", test_image, "-m", llava_ckpt)
    assert (code, out) == (1, "")
    assert err == "internal error: RuntimeError: boom (run with --debug for the traceback)\n"
    code, out, err = run(capsys, "--debug", "describe", test_image, "-m", llava_ckpt)
    assert code == 1 and "Traceback" in err and "RuntimeError: boom" in err
