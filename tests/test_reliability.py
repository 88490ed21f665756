"""Faults from REFERENCE.md not covered elsewhere: each gives one clear line naming the file
or value, the contract's exit code, and no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from vlmcli.cli import main
from vlmcli.errors import ContextLengthError, VlmError
from vlmcli.pipeline import Pipeline
from vlmcli.sequence import build_sequence, user_message


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sharded(capsys, make_llava, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(make_llava(shards=3), dst)
    capsys.readouterr()  # drop what building the checkpoint printed
    return dst


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_shard_missing_from_disk(capsys, sharded, test_image):
    shard = sorted(set(_index(sharded)["weight_map"].values()))[1]
    (sharded / shard).unlink()
    code, out, err = run(capsys, "describe", test_image, "-m", sharded)
    assert (code, out) == (1, "")
    assert err == (f"error: shard '{shard}' listed in model.safetensors.index.json is missing (re-download the model)\n")


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entry_leaving_the_folder_refused(capsys, sharded, test_image, escape):
    index = _index(sharded)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = escape
    _write_index(sharded, index)
    code, out, err = run(capsys, "describe", test_image, "-m", sharded)
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and f"names a shard outside the model folder: '{escape}'" in err


def test_index_entry_with_a_nul_character_refused(capsys, sharded, test_image):
    """Found by test_fuzz: the OS refuses such a path with a ValueError, not an OSError."""
    index = _index(sharded)
    index["weight_map"][next(iter(index["weight_map"]))] = "model\x00.safetensors"
    _write_index(sharded, index)
    code, out, err = run(capsys, "describe", test_image, "-m", sharded)
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and "names a shard with a NUL character: 'model\\x00.safetensors'" in err


def test_checkpoint_code_is_never_run(capsys, llava_ckpt, test_image, tmp_path):
    """auto_map points at Python in the folder; vlm must load the model without importing it."""
    folder = tmp_path / "m"
    shutil.copytree(llava_ckpt, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "describe", test_image, "-m", folder, "--max-tokens", 2, "-q")
    assert code == 0, err
    assert not marker.exists()


def test_image_count_mismatch_caught_before_the_forward_pass(llava_ckpt):
    pipe = Pipeline.load(str(llava_ckpt), "cpu")
    # A template that drops images: the sequence check must notice, not the model.
    pipe.tokenizer.chat_template = "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}"
    with pytest.raises(VlmError, match="the chat template wrote 0 image placeholders for 1 images"):
        build_sequence(
            pipe.tokenizer,
            [user_message("hi", 1)],
            image_token_id=pipe.config.image_token_id,
            tokens_per_image=pipe.tokens_per_image,
            context_length=pipe.context_length,
        )


def test_prompt_longer_than_the_context_says_both_numbers(capsys, llava_ckpt, test_image):
    code, out, err = run(capsys, "describe", test_image, "-m", llava_ckpt, "-p", "word " * 600)
    assert (code, out) == (1, "")
    assert "but the model's context is 512 tokens" in err and "error: the prompt is" in err
    assert issubclass(ContextLengthError, VlmError)


@pytest.mark.parametrize(
    "where, message",
    [
        ("load", "error: out of memory while loading the model (try -b int4 or a smaller model)\n"),
        ("describe", "error: out of memory while generating (try fewer --max-tokens, fewer images or -b int4)\n"),
    ],
)
def test_out_of_memory_says_when(capsys, monkeypatch, llava_ckpt, test_image, where, message):
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Pipeline, where, oom)
    code, out, err = run(capsys, "describe", test_image, "-m", llava_ckpt)
    assert (code, out, err) == (1, "", message)
