"""`vlm bench`: one row per backend (each measured in a child process), failures as rows,
usage errors as exit 2. Nothing here depends on how fast anything runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from backends.cuda import CudaBackend
from vlmcli.bench import synthetic_image
from vlmcli.cli import main
from vlmcli.cli.bench import DEFAULT_PROMPT

STAGES = ("load_s", "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_a_row_per_backend_with_what_describe_generates(capsys, llava_ckpt, tmp_path):
    code, out, err = run(capsys, "bench", "-m", llava_ckpt, "-b", "cpu", "-b", "cpu-bf16", "--tokens", 8, "--runs", 1, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == str(llava_ckpt) and report["tokens"] == 8 and report["runs"] == 1
    assert set(report["machine"]) == {"cpu", "logical_cores", "torch", "torch_threads", "cuda_device"}
    assert report["machine"]["torch"] == torch.__version__
    assert [row["backend"] for row in report["backends"]] == ["cpu", "cpu-bf16"]

    # the default image is the synthetic one: describe it as a file, with the same settings
    image = tmp_path / "synthetic.png"
    image.write_bytes(synthetic_image())
    for row in report["backends"]:
        assert row["ok"] and row["runs_as"] == row["backend"] and row["device"] == "cpu"
        code, out, err = run(
            capsys, "describe", image, "-m", llava_ckpt, "-b", row["backend"], "-p", DEFAULT_PROMPT, "--max-tokens", 8, "--json", "-q"
        )
        assert code == 0, err
        expected = json.loads(out)
        assert row["tokens"] == len(expected["tokens"])
        assert row["finish_reason"] == expected["finish_reason"]
        assert (row["prompt_tokens"], row["image_tokens"]) == (expected["prompt_tokens"], expected["image_tokens"])
        assert row["tokens"] == 8 or row["finish_reason"] == "stop"
        for stage in STAGES:
            assert isinstance(row[stage], (int, float)) and row[stage] > 0, (row["backend"], stage, row[stage])
        assert row["peak_rss_bytes"] > 0 and row["peak_gpu_bytes"] is None


def test_table_names_the_columns_and_backends(capsys, llava_ckpt, test_image):
    code, out, err = run(capsys, "bench", "-m", llava_ckpt, "-b", "auto", "--image", test_image, "--tokens", 8, "--runs", 1)
    assert code == 0, err
    for column in ("backend", "load s", "preprocess ms", "vision ms", "prefill ms", "TTFT ms", "decode tok/s", "peak RSS MiB"):
        assert column in out
    assert "peak GPU MiB" not in out
    assert "auto (cpu)" in out and str(test_image) in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_unavailable_backend_is_a_row_with_its_reason(capsys, llava_ckpt):
    code, out, err = run(capsys, "bench", "-m", llava_ckpt, "-b", "cuda", "--json")
    assert code == 1, err
    (row,) = json.loads(out)["backends"]
    assert row == {"backend": "cuda", "ok": False, "reason": CudaBackend().unavailable_reason()}
    code, out, _ = run(capsys, "bench", "-m", llava_ckpt, "-b", "cuda")
    assert code == 1
    assert f"  cuda: {CudaBackend().unavailable_reason()}" in out.splitlines()


def test_a_backend_failing_in_its_child_is_a_row(capsys, llava_ckpt, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(llava_ckpt, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # the config still reads; loading fails
    code, out, err = run(capsys, "bench", "-m", bad, "-b", "cpu", "--tokens", 2, "--runs", 1, "--json")
    assert code == 1, err
    (row,) = json.loads(out)["backends"]
    assert not row["ok"] and "model.safetensors" in row["reason"]
    assert "\n" not in row["reason"] and not row["reason"].startswith("error:")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["-b", "cpu", "-b", "tpu"], 2, "unknown backend 'tpu' (choose from: auto, cpu, cpu-bf16, cuda, bf16, int8, int4, q8, q4)"),
        (["--tokens", "0"], 2, "error: invalid value for '--tokens': Input should be greater than or equal to 1\nTry 'vlm bench --help' for help.\n"),
        (["--image", "{missing}"], 1, "cannot read image '{missing}': no such file"),
    ],
)
def test_errors_are_one_line(capsys, llava_ckpt, tmp_path, args, code, message):
    missing = tmp_path / "missing.png"
    got, out, err = run(capsys, "bench", "-m", llava_ckpt, *[a.format(missing=missing) for a in args])
    assert got == code
    assert message.format(missing=missing) in err
    assert out == "" and "Traceback" not in err
    if not message.startswith("error: invalid value"):  # Click's own usage errors come with a hint line
        assert len(err.strip().splitlines()) == 1


def test_threads_reach_the_report_and_a_bad_count_is_a_usage_error():
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "vlmcli", "bench", "-m", "demo", "-b", "cpu", "--runs", "1", "--tokens", "2", "--json", "-q"]
    proc = subprocess.run([*args, "--threads", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["machine"]["torch_threads"] == 1
    env = {**os.environ, "VLM_THREADS": "two"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "VLM_THREADS" in proc.stderr.splitlines()[0], proc.stderr
