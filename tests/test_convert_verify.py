"""`vlm convert` loads what it wrote and runs it once before moving it into place
(`--no-verify` skips that), and names its model with -m like the other commands. On the
bundled demo model: fp16 needs no bitsandbytes, and each conversion takes about a second."""

from __future__ import annotations

import json

import pytest
import torch

from vlmcli import checkpoint as ckpt_module
from vlmcli.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _write_wrong(monkeypatch, key_part, how):
    """Make the writer drop (how="drop") or NaN-fill (how="nan") the tensors whose name has `key_part`."""
    real = ckpt_module.ShardedWriter.add

    def add(self, name, tensor):
        if key_part in name:
            if how == "drop":
                return None
            tensor = torch.full_like(tensor, float("nan"))
        return real(self, name, tensor)

    monkeypatch.setattr(ckpt_module.ShardedWriter, "add", add)


def test_a_good_conversion_says_it_was_verified(capsys, tmp_path):
    out = tmp_path / "demo-fp16"
    code, stdout, err = run(capsys, "convert", "-m", "demo", out, "--to", "fp16")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (fp16): 0 layers quantized")
    assert err == f"verified: {out} loads with -b cpu and runs\n"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    code, stdout, err = run(capsys, "convert", "demo", tmp_path / "again", "--to", "bf16", "-q")
    assert (code, err) == (0, "") and stdout.startswith(f"wrote {tmp_path / 'again'} (bf16)")


def test_a_quantized_conversion_is_verified_with_its_backend(capsys, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "demo-nf4"
    code, _, err = run(capsys, "convert", "-m", "demo", out, "--to", "nf4")
    assert (code, err) == (0, f"verified: {out} loads with -b int4 and runs\n")


def test_an_output_that_does_not_load_is_not_written(capsys, monkeypatch, tmp_path):
    _write_wrong(monkeypatch, "language_model.lm_head.weight", "drop")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "-m", "demo", out, "--to", "fp16")
    assert (code, stdout) == (1, "")
    assert err == (
        "error: the converted model failed its check, loading it with -b cpu: "
        f"{out.parent / _leftover_name(err)}/model.safetensors is missing tensor 'language_model.lm_head.weight' "
        f"(decoder.lm_head.weight); {out} was not written\n"
    ) or err.startswith("error: the converted model failed its check, loading it with -b cpu: ")
    assert err.endswith(f"; {out} was not written\n") and err.count("\n") == 1
    assert "lm_head" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def _leftover_name(err):  # the temporary folder the message names, if it names one
    return err.split("/")[-2] if "/" in err else ""


def test_an_output_that_gives_nan_keeps_the_old_one(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, "convert", "-m", "demo", out, "--to", "fp16", "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _write_wrong(monkeypatch, "embed_tokens", "nan")
    code, stdout, err = run(capsys, "convert", "-m", "demo", out, "--to", "bf16", "--force")
    assert (code, stdout, err) == (
        1,
        "",
        "error: the converted model failed its check, running it with -b cpu: the first forward pass gives "
        f"logits that are not finite (NaN or inf); {out} was left as it was\n",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_no_verify_skips_the_check(capsys, monkeypatch, tmp_path):
    _write_wrong(monkeypatch, "embed_tokens", "nan")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "-m", "demo", out, "--to", "fp16", "--no-verify")
    assert (code, err) == (0, "") and stdout.startswith(f"wrote {out} (fp16)")
    assert (out / "config.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "{out}", "-m", "demo"], "the model is given twice, as SOURCE ('demo') and with -m ('demo'); give one"),
        (["{out}"], "no model to convert: give SOURCE OUTPUT, or -m MODEL OUTPUT"),
        (["demo", "{out}", "extra"], "convert takes SOURCE and OUTPUT, or -m MODEL and OUTPUT; got 3 paths"),
    ],
)
def test_naming_the_source(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.delenv("VLM_MODEL", raising=False)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", *[a.format(out=out) for a in args], "--to", "fp16")
    assert (code, stdout, err) == (2, "", f"error: {message}\n")
    assert not out.exists()


def test_vlm_model_names_the_source_and_yields_to_source(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_MODEL", "demo")
    code, stdout, _ = run(capsys, "convert", tmp_path / "a", "--to", "fp16", "-q")
    assert code == 0 and stdout.startswith(f"wrote {tmp_path / 'a'} (fp16)")
    monkeypatch.setenv("VLM_MODEL", str(tmp_path / "no-such-model"))
    code, stdout, _ = run(capsys, "convert", "demo", tmp_path / "b", "--to", "fp16", "-q")
    assert code == 0 and stdout.startswith(f"wrote {tmp_path / 'b'} (fp16)")
