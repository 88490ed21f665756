"""The CLI contract: output on stdout, one-line errors on stderr, exit codes 0/1/2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vlmcli import __version__
from vlmcli.cli import main
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    assert run(capsys, "--version") == (0, f"vlm {__version__}\n", "")


def test_describe_json_lines(capsys, llava_ckpt, make_test_image):
    images = [make_test_image(size=(64, 48), seed=1), make_test_image(size=(40, 70), seed=2)]
    code, out, err = run(
        capsys, "describe", *images, "-m", llava_ckpt, "-b", "cpu", "--max-tokens", 12, "--json", "-p", "What?"
    )
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in images]
    pipe = Pipeline.load(str(llava_ckpt), "cpu")
    for record, image in zip(records, images):
        expected = pipe.describe([image], "What?", SamplingOptions(max_new_tokens=12))
        assert record["tokens"] == expected.tokens and len(record["tokens"]) == 12
        assert record["text"] == expected.text
        assert record["prompt_tokens"] == expected.prompt_tokens
        assert record["image_tokens"] == 25
        assert record["finish_reason"] == "length"
        assert record["model"] == str(llava_ckpt) and record["backend"] == "cpu"
        assert record["prompt"] == "What?"
        assert set(record["timings"]) == {"preprocess_ms", "vision_ms", "prefill_ms", "decode_tokens_per_s"}


def test_describe_plain_text_streams_the_same_text(capsys, llava_ckpt, test_image):
    code, out, _ = run(capsys, "describe", test_image, "-m", llava_ckpt, "--max-tokens", 10, "-q")
    assert code == 0
    expected = Pipeline.load(str(llava_ckpt), "cpu").describe([test_image], "Describe this image.", SamplingOptions(max_new_tokens=10))
    assert out == expected.text + "\n"


def test_several_images_get_headers(capsys, llava_ckpt, make_test_image):
    a, b = make_test_image(seed=4), make_test_image(seed=5)
    code, out, _ = run(capsys, "describe", a, b, "-m", llava_ckpt, "--max-tokens", 3, "-q")
    assert code == 0
    assert out.startswith(f"==> {a} <==\n") and f"\n\n==> {b} <==\n" in out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["describe", "{img}", "-m", "{ckpt}", "--max-tokens", "0"], 2, "error: invalid value for '--max-tokens': Input should be greater than or equal to 1\nTry 'vlm describe --help' for help.\n"),
        (["describe", "{img}", "-m", "{ckpt}", "-b", "tpu"], 2, "unknown backend 'tpu' (choose from: auto, cpu, cpu-bf16, cuda, bf16, int8, int4, q8, q4)"),
        (["describe", "{img}", "-m", "./no/such/folder"], 2, "model './no/such/folder' is neither a folder nor a hub repo id"),
        (["describe", "{missing}", "-m", "{ckpt}"], 1, "cannot read image '{missing}': no such file"),
        (["describe"], 2, "error: missing argument 'IMAGE'\nTry 'vlm describe --help' for help.\n"),
    ],
)
def test_errors_are_one_line(capsys, llava_ckpt, test_image, tmp_path, args, code, message):
    fill = dict(img=test_image, ckpt=llava_ckpt, missing=tmp_path / "missing.png")
    got, out, err = run(capsys, *[a.format(**fill) for a in args])
    assert got == code
    assert message.format(**fill) in err
    assert "Traceback" not in err and out == ""


def _copy(src, dst, drop=(), edit_config=None):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_model_type_lists_supported(capsys, llava_ckpt, test_image, tmp_path):
    bad = _copy(llava_ckpt, tmp_path / "m", edit_config=lambda c: c.update(model_type="fuyu"))
    code, _, err = run(capsys, "describe", test_image, "-m", bad)
    assert code == 1
    from vlmcli.families import supported_model_types

    assert f"config.json has 'fuyu'; supported model types: {', '.join(supported_model_types())}\n" in err
    assert "internvl" in supported_model_types() and "llava" in supported_model_types()


def test_pickle_weights_refused(capsys, llava_ckpt, test_image, tmp_path):
    bad = _copy(llava_ckpt, tmp_path / "m", drop=["model.safetensors"])
    (bad / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, _, err = run(capsys, "describe", test_image, "-m", bad)
    assert code == 1
    assert "holds only pickle weights (pytorch_model.bin)" in err and "safetensors only" in err


def test_missing_tokenizer_named(capsys, llava_ckpt, test_image, tmp_path):
    bad = _copy(llava_ckpt, tmp_path / "m", drop=["tokenizer.json"])
    code, _, err = run(capsys, "describe", test_image, "-m", bad)
    assert code == 1
    assert "tokenizer.json" in err and "Traceback" not in err


def test_truncated_safetensors_named(capsys, llava_ckpt, test_image, tmp_path):
    bad = _copy(llava_ckpt, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "describe", test_image, "-m", bad)
    assert code == 1
    assert "model.safetensors is not a valid safetensors file" in err and "re-download" in err


def test_shape_mismatch_named(capsys, llava_ckpt, test_image, tmp_path):
    def widen(cfg):
        cfg["text_config"]["intermediate_size"] = 100

    bad = _copy(llava_ckpt, tmp_path / "m", edit_config=widen)
    code, _, err = run(capsys, "describe", test_image, "-m", bad)
    assert code == 1
    assert "error: tensor 'language_model.model.layers.0.mlp.down_proj.weight' has shape [64, 96] but config.json implies [64, 100]" in err


def test_offline_and_not_cached(capsys, test_image, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these at import; run in a child so the settings apply
    proc = subprocess.run(
        [sys.executable, "-m", "vlmcli", "describe", str(test_image), "-m", "someone/some-model"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode == 1
    assert "model 'someone/some-model' is not in the cache" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "-m demo" in proc.stderr
    assert str(tmp_path / "hf") in proc.stderr


def test_debug_shows_traceback(capsys, test_image, tmp_path):
    code, _, err = run(capsys, "--debug", "describe", tmp_path / "nope.png", "-m", tmp_path)
    assert code == 1
    assert "Traceback" in err


def test_console_script_exit_code(llava_ckpt, tmp_path):
    """The installed `vlm` entry point, not just main(): real process, real exit code."""
    vlm = shutil.which("vlm", path=os.path.dirname(sys.executable))
    proc = subprocess.run([vlm, "describe", str(tmp_path / "x.png"), "-m", str(llava_ckpt)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: cannot read image '{tmp_path / 'x.png'}': no such file"


def test_control_characters_are_escaped_on_a_terminal_only(monkeypatch, capsys):
    """A model can emit any byte; ESC or CSI written raw would drive the user's terminal."""
    from vlmcli.cli import console

    text = "a\x1b[2Jb\x06\r\n\tc\x9bd\x7fé"
    assert console.terminal_safe(text) == "a\\x1b[2Jb\\x06\\x0d\n\tc\\x9bd\\x7fé"
    console.write_result(text)  # captured: not a terminal, the text as the model wrote it
    assert capsys.readouterr().out == text
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    console.write_result(text)
    assert capsys.readouterr().out == console.terminal_safe(text)


def test_ctrl_c_says_interrupted_and_exits_130(capsys, monkeypatch, test_image):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlmcli.cli.describe.load_pipeline", interrupt)
    code, out, err = run(capsys, "describe", test_image, "-m", "demo")
    assert (code, out, err) == (130, "", "interrupted\n")
