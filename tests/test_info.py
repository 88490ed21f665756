"""`vlm info`: parameter counts against transformers, memory estimates against what a load
really allocates, and the two output forms."""

from __future__ import annotations

import json

import pytest
import torch

from vlmcli.cli import main
from vlmcli.info import model_info
from vlmcli.pipeline import Pipeline


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_transformers(llava_ckpt):
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(llava_ckpt, dtype=torch.float32)
    info = model_info(str(llava_ckpt), download_progress=False)
    tower = ref.model.vision_tower
    used = info["vision"]["layers_used"]
    assert (used, info["vision"]["layers"]) == (2, 3)  # feature layer -2: the last block never runs
    assert info["parameters"]["vision"] == (
        _numel(tower.embeddings) + _numel(tower.pre_layrnorm) + sum(_numel(b) for b in tower.encoder.layers[:used])
    )
    assert info["parameters"]["projector"] == _numel(ref.model.multi_modal_projector)
    assert info["parameters"]["decoder"] == _numel(ref.model.language_model) + _numel(ref.lm_head)
    assert info["image_tokens"] == 25
    assert info["checkpoint"]["format"] == "fp32" and info["checkpoint"]["unused_tensors"] > 0


def _allocated(model) -> int:
    """Bytes of every weight and quantization state a loaded model holds."""
    total = 0
    storages = set()
    for p in model.parameters():
        if p.untyped_storage().data_ptr() in storages:
            continue  # a tied embedding is a view of lm_head's matrix
        storages.add(p.untyped_storage().data_ptr())
        total += p.numel() * p.element_size()
        scb = getattr(p, "SCB", None)  # int8 row scales
        if scb is not None:
            total += scb.numel() * scb.element_size()
        qs = getattr(p, "quant_state", None)  # 4-bit scales and code book
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * 4 + qs.state2.code.numel() * 4
    for module in model.modules():  # q8 / q4: codes and their scales are buffers
        for name in ("codes", "scales", "packed", "scale_zeros"):
            buf = module._buffers.get(name)
            if buf is not None:
                total += buf.numel() * buf.element_size()
    return total


@pytest.mark.parametrize("spec", ["cpu", "cpu-bf16", "int8", "int4", "q8", "q4"])
def test_estimates_are_what_loading_allocates(make_llava, spec):
    if spec.startswith("int"):
        pytest.importorskip("bitsandbytes")
    path = make_llava(num_key_value_heads=4, tie_word_embeddings=True)
    row = next(r for r in model_info(str(path), download_progress=False)["backends"] if r["backend"] == spec)
    assert row["weights_bytes"] == _allocated(Pipeline.load(str(path), spec).model)


def test_estimate_of_a_prequantized_checkpoint(hf_quantized):
    """transformers-saved nf4 with double quantization, vision tower included: the estimate
    for `-b int4` is the checkpoint's own layers, for `-b int8` a refusal."""
    path = hf_quantized("nf4", double_quant=True)
    rows = {r["backend"]: r for r in model_info(str(path), download_progress=False)["backends"]}
    assert rows["int4"]["weights_bytes"] == _allocated(Pipeline.load(str(path), "int4").model)
    assert rows["int8"]["available"] is False and "quantized to nf4" in rows["int8"]["reason"]
    assert rows["cpu"]["weights_bytes"] == _allocated(Pipeline.load(str(path), "cpu").model)


def test_json_output(capsys, llava_ckpt):
    code, out, err = run(capsys, "info", llava_ckpt, "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["family"] == "LLaVA" and data["model_type"] == "llava"
    assert [r["backend"] for r in data["backends"]] == ["cpu", "cpu-bf16", "cuda", "bf16", "int8", "int4", "q8", "q4"]
    cpu = data["backends"][0]
    assert cpu["available"] is True and cpu["device"] == "cpu"
    # two tensors (k, v) per layer per token: 2 layers x 2 KV heads x 16 dims x 1000 tokens x 4 bytes x 2
    assert cpu["kv_cache_bytes_per_1k_tokens"] == 2 * 2 * 2 * 16 * 1000 * 4


def test_text_output(capsys, llava_ckpt):
    code, out, _ = run(capsys, "info", llava_ckpt)
    assert code == 0
    assert "LLaVA (llava)" in out and "25 tokens per image" in out
    for name in ("cpu-bf16", "int8", "int4"):
        assert f"│ {name}" in out
    if not torch.cuda.is_available():
        assert "cuda, bf16: " in out  # why the GPU rows cannot run here


def test_missing_model(capsys, tmp_path):
    code, out, err = run(capsys, "info", tmp_path)
    assert code == 1 and out == ""
    assert err == f"error: {tmp_path} has no config.json: not a Hugging Face model folder\n"
