"""`vlm convert`: the output is what transformers writes, loads in transformers and in vlm
with the same tokens, and the command refuses what it should and leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.quantized_checkpoints import (  # noqa: E402
    VLM_SKIP,
    greedy_reference,
    load_reference,
    our_logits,
    quantized_module_names,
    reference_inputs,
)
from vlmcli import __version__  # noqa: E402
from vlmcli import checkpoint as ckpt_module  # noqa: E402
from vlmcli.cli import main  # noqa: E402
from vlmcli.convert import PROVENANCE_NAME, ConvertOptions, convert  # noqa: E402
from vlmcli.generate import SamplingOptions  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

PROMPT = "What is in the picture?"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def converted(llava_ckpt, tmp_path_factory):
    built = {}

    def factory(to, source=None, **opts):
        source = source or llava_ckpt
        key = (to, str(source), tuple(sorted(opts.items())))
        if key not in built:
            out = tmp_path_factory.mktemp(f"conv-{to}") / "out"
            built[key] = convert(str(source), out, ConvertOptions(to=to, **opts), download_progress=False).output
        return built[key]

    return factory


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("to, dq", [("int8", False), ("nf4", False), ("fp4", True)])
def test_output_is_what_transformers_saves(converted, hf_quantized, to, dq):
    """Tensor for tensor (names, dtypes, shapes, bytes) and quantization_config key for key,
    our output equals transformers' save_pretrained of the same quantization."""
    ours = converted(to, double_quant=dq)
    theirs = hf_quantized(to, double_quant=dq, skip=VLM_SKIP)
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ours_q = json.loads((ours / "config.json").read_text())["quantization_config"]
    theirs_q = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert ours_q == theirs_q
    if to != "int8":
        assert any(k.endswith(".weight.nested_absmax") for k in a) == dq
        assert any(k.endswith(f".weight.quant_state.bitsandbytes__{to}") for k in a)
    else:
        assert any(k.endswith(".SCB") for k in a) and any(k.endswith(".weight_format") for k in a)


@pytest.mark.parametrize("to", ["int8", "nf4"])
def test_transformers_runs_our_output_token_for_token(converted, test_image, to):
    path = converted(to)
    ref = load_reference(path)
    layers = quantized_module_names(ref)
    assert len(layers) == 14 and all(n.startswith("model.language_model.layers.") for n in layers)
    ours = Pipeline.load(str(path), "auto")
    assert ours.backend.format == to
    inputs = reference_inputs(path, [test_image], PROMPT)
    with torch.inference_mode():
        want = ref(**inputs).logits
    assert (our_logits(ours, inputs) - want).abs().max() <= 1e-5 * want.abs().max()  # measured: 0.0
    tokens = ours.ask([user_message(PROMPT, 1)], [test_image], SamplingOptions(max_new_tokens=16, temperature=0)).tokens
    assert tokens == greedy_reference(ref, inputs, 16, ours.stop_ids)
    assert len(set(tokens)) >= 8


def test_cli_describe_on_a_converted_checkpoint(capsys, converted, test_image):
    path = converted("nf4")
    code, out, err = run(capsys, "describe", test_image, "-m", path, "--json", "--max-tokens", 6, "-p", PROMPT)
    assert code == 0, err
    record = json.loads(out)
    assert record["backend"] == "int4" and len(record["tokens"]) == 6


@pytest.mark.parametrize("to, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_16_bit_output(converted, test_image, to, dtype):
    path = converted(to)
    tensors = _tensors(path)
    assert {t.dtype for t in tensors.values()} == {dtype}
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.") and "quantization_config" not in config
    ref = load_reference(path)  # transformers in fp32 on the 16-bit weights, like -b cpu
    ours = Pipeline.load(str(path), "cpu")
    inputs = reference_inputs(path, [test_image], PROMPT)
    with torch.inference_mode():
        want = ref(**inputs).logits
    assert (our_logits(ours, inputs) - want).abs().max() <= 1e-4 * want.abs().max()


def test_sharded_output(converted, test_image):
    path = converted("int8", max_shard_bytes=100_000)
    index = json.loads((path / ckpt_module.INDEX_NAME).read_text())
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(path).values())
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or os.path.getsize(path / shard) <= 100_000 + 8_000  # + header
    ref = load_reference(path)
    ours = Pipeline.load(str(path), "auto")
    inputs = reference_inputs(path, [test_image], PROMPT)
    with torch.inference_mode():
        assert torch.equal(our_logits(ours, inputs), ref(**inputs).logits)


def test_quantize_all_with_tied_embeddings(make_llava, converted, test_image):
    """--quantize-all takes the vision tower and projector too (and every vision block, also
    the one LLaVA never runs, as transformers expects); a tied lm_head stays with the
    embeddings."""
    source = make_llava(num_key_value_heads=4, tie_word_embeddings=True)
    path = converted("nf4", source=source, quantize_all=True)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["llm_int8_skip_modules"] == ["lm_head"]
    names = set(_tensors(path))
    assert "vision_tower.encoder.layers.2.mlp.fc1.weight.absmax" in names  # the unused last block
    ref = load_reference(path)
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in quantized_module_names(ref)
    ours = Pipeline.load(str(path), "auto")
    assert "projector.linear_1" in quantized_module_names(ours.model)
    inputs = reference_inputs(path, [test_image], PROMPT)
    with torch.inference_mode():
        want = ref(**inputs).logits
    assert (our_logits(ours, inputs) - want).abs().max() <= 1e-5 * want.abs().max()


def test_from_a_quantized_source(hf_quantized, converted, test_image, monkeypatch):
    """nf4 (vision tower quantized, as transformers does by default) -> int8 with vlm's
    defaults: vision layers dequantized back to float, decoder requantized to int8; and
    nf4 -> nf4 copies the already-quantized layers without quantizing them again."""
    source = hf_quantized("nf4")
    path = converted("int8", source=source)
    tensors = _tensors(path)
    assert tensors["vision_tower.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float32
    assert tensors["language_model.model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    ref = load_reference(path)
    ours = Pipeline.load(str(path), "auto")
    inputs = reference_inputs(path, [test_image], PROMPT)
    with torch.inference_mode():
        want = ref(**inputs).logits
    assert (our_logits(ours, inputs) - want).abs().max() <= 1e-5 * want.abs().max()

    calls = []
    real = bnb.functional.quantize_4bit
    monkeypatch.setattr(bnb.functional, "quantize_4bit", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    same = converted("nf4", source=source, quantize_all=True)
    assert calls == [torch.Size([512, 64])]  # only lm_head, which transformers left unquantized
    a, b = _tensors(same), _tensors(source)
    assert sorted(a) == sorted(set(b) | {k for k in a if k.startswith("language_model.lm_head.")})
    assert all(torch.equal(a[k], b[k]) for k in b if not k.startswith("language_model.lm_head."))


def test_provenance_and_side_files(converted, llava_ckpt):
    path = converted("nf4")
    record = json.loads((path / PROVENANCE_NAME).read_text())
    assert record["tool"] == f"vlm {__version__}"
    assert record["source"] == str(llava_ckpt.resolve()) and record["to"] == "nf4"
    assert record["source_format"] == "unquantized" and record["date"].endswith("+00:00")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
        assert (path / name).read_bytes() == (llava_ckpt / name).read_bytes()
    again = convert(str(path), path.parent / "again", ConvertOptions(to="int8"), download_progress=False).output
    assert json.loads((again / PROVENANCE_NAME).read_text())["previous"] == record


# ---- the command: refusals, exit codes, atomicity -------------------------------------------


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_existing_output_refused_without_force(capsys, llava_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, stdout, err = run(capsys, "convert", llava_ckpt, out, "--to", "nf4")
    assert (code, stdout, err) == (2, "", f"error: '{out}' already exists (pass --force to replace it)\n")
    assert (out / "config.json").read_text() == "{}"
    code, stdout, err = run(capsys, "convert", llava_ckpt, out, "--to", "nf4", "--force", "-q")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (nf4): 14 layers quantized, 21 kept")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "output, force, message",
    [
        ("{src}", False, "error: OUTPUT is the SOURCE folder; write the converted model to a new folder\n"),
        ("{src}", True, "error: OUTPUT is the SOURCE folder; write the converted model to a new folder\n"),
        ("{src}/.", True, "error: OUTPUT is the SOURCE folder; write the converted model to a new folder\n"),
        ("{parent}", True, "error: OUTPUT '{parent}' contains the source model; choose another folder\n"),
        ("{stranger}", True, "error: '{stranger}' is not a model folder (no config.json); refusing to replace it\n"),
        ("{file}", True, "error: '{file}' is not a folder; refusing to replace it\n"),
    ],
)
def test_refused_outputs(capsys, llava_ckpt, tmp_path, output, force, message):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(llava_ckpt, src)
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("keep me")
    fill = dict(src=src, parent=tmp_path, stranger=stranger, file=tmp_path / "notes.txt")
    args = ["convert", src, output.format(**fill), "--to", "int8"] + (["--force"] if force else [])
    code, stdout, err = run(capsys, *args)
    assert (code, stdout, err) == (2, "", message.format(**fill))
    assert (stranger / "holiday.jpg").exists() and (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in llava_ckpt.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--to", "int3"], "error: unknown --to 'int3' (choose from: int8, nf4, fp4, q8, q4, fp16, bf16)\n"),
        (["--to", "nf4", "--max-shard-size", "lots"], "error: 'lots' is not a size (examples: 500MB, 5GB, 2GiB)\n"),
    ],
)
def test_bad_options(capsys, llava_ckpt, tmp_path, args, message):
    code, stdout, err = run(capsys, "convert", llava_ckpt, tmp_path / "out", *args)
    assert (code, stdout, err) == (2, "", message)
    assert list(tmp_path.iterdir()) == []


def test_missing_to(capsys, llava_ckpt, tmp_path):
    code, _, err = run(capsys, "convert", llava_ckpt, tmp_path / "out")
    assert (code, err) == (2, "error: missing option '--to'\nTry 'vlm convert --help' for help.\n")


def test_parse_size():
    assert ckpt_module.parse_size("5GB") == 5 * 10**9
    assert ckpt_module.parse_size("2GiB") == 2 * 2**30
    assert ckpt_module.parse_size("500mb") == 500 * 10**6
    assert ckpt_module.parse_size("1000") == 1000


def _fail_after(monkeypatch, n, error):
    calls = {"n": 0}
    real = ckpt_module.ShardedWriter.add

    def add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > n:
            raise error
        return real(self, name, tensor)

    monkeypatch.setattr(ckpt_module.ShardedWriter, "add", add)


def test_disk_full_leaves_nothing_behind(capsys, monkeypatch, llava_ckpt, tmp_path):
    _fail_after(monkeypatch, 20, OSError(errno.ENOSPC, "No space left on device"))
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", llava_ckpt, out, "--to", "nf4", "--max-shard-size", "50KB")
    assert (code, stdout, err) == (1, "", f"error: could not write {out}: No space left on device\n")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_force_keeps_the_old_output(capsys, monkeypatch, llava_ckpt, tmp_path):
    out = tmp_path / "out"
    convert(str(llava_ckpt), out, ConvertOptions(to="int8"), download_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_after(monkeypatch, 5, KeyboardInterrupt())
    code, stdout, _ = run(capsys, "convert", llava_ckpt, out, "--to", "nf4", "--force")
    assert code == 130 and stdout == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_progress_reaches_the_total(llava_ckpt, tmp_path):
    seen = []
    convert(str(llava_ckpt), tmp_path / "out", ConvertOptions(to="fp16"), progress=lambda d, t: seen.append((d, t)), download_progress=False)
    total = seen[-1][1]
    assert seen[-1] == (total, total) and [d for d, _ in seen] == list(range(1, total + 1))


def _kill_convert_when(llava_ckpt, out, seen_tmp_files: int) -> None:
    """Start `vlm convert` in a child process and SIGKILL it once its temporary folder holds
    `seen_tmp_files` files (0: as soon as the folder exists)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmcli", "convert", str(llava_ckpt), str(out), "--to", "int8",
         "--max-shard-size", "20KB", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            tmp = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
            if tmp and len(list(tmp[0].iterdir())) >= seen_tmp_files:
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("files_before_kill", [0, 3, 12])
def test_sigkill_leaves_no_output_or_a_complete_one(llava_ckpt, tmp_path, files_before_kill):
    """A convert killed outright (no cleanup can run) never leaves a half-written OUTPUT."""
    reference = tmp_path / "reference"
    convert(str(llava_ckpt), reference, ConvertOptions(to="int8", max_shard_bytes=20_000), download_progress=False)
    out = tmp_path / "out"
    _kill_convert_when(llava_ckpt, out, files_before_kill)
    if out.exists():  # the rename happened before the kill: it must be the whole result
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
        for p in reference.glob("*.safetensors"):
            assert (out / p.name).read_bytes() == p.read_bytes()
    # a later convert still works, whatever the killed one left in its temporary folder
    convert(str(llava_ckpt), out, ConvertOptions(to="int8", max_shard_bytes=20_000, force=True), download_progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_sigterm_cleans_up_like_ctrl_c(capsys, monkeypatch, llava_ckpt, tmp_path):
    """SIGTERM mid-write (sent by the process to itself, so the moment is exact): the
    temporary folder is removed, OUTPUT never appears, exit 143 with one line."""
    import os
    import signal

    from vlmcli.cli import sigterm_raises

    calls = {"n": 0}
    real = ckpt_module.ShardedWriter.add

    def add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, name, tensor)

    monkeypatch.setattr(ckpt_module.ShardedWriter, "add", add)
    out = tmp_path / "out"
    with sigterm_raises():
        code, stdout, err = run(capsys, "convert", llava_ckpt, out, "--to", "int8", "-q")
    assert (code, stdout, err) == (143, "", "terminated\n")
    assert not out.exists() and _leftovers(tmp_path) == []
