"""The CUDA backends on a real GPU; skipped where PyTorch sees none.

fp16 / bf16 are compared with fp32 on the CPU; int8 and nf4 with transformers quantizing the
same checkpoint the same way on the same GPU (both run bitsandbytes' CUDA kernels, so they
should agree to fp16 rounding). benchmarks/gpu_check.py is the broader check (real weights,
memory, speed). The bounds here are set from the CPU measurements and fp16's precision; they
have not been run on a GPU yet (the development machine has none).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tests.quantized_checkpoints import VLM_SKIP, bnb_config, our_logits, reference_inputs  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402

PROMPT = "What is in the picture?"


def _on(inputs, device, dtype):
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


@pytest.mark.parametrize("spec, bound", [("cuda", 0.01), ("bf16", 0.08)])
def test_16_bit_close_to_fp32(llava_ckpt, test_image, spec, bound):
    if spec == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    inputs = reference_inputs(llava_ckpt, [test_image], PROMPT)
    want = our_logits(Pipeline.load(str(llava_ckpt), "cpu"), inputs)
    pipe = Pipeline.load(str(llava_ckpt), spec)
    assert pipe.model.decoder.embed_tokens.weight.device.type == "cuda"
    got = our_logits(pipe, _on(inputs, "cuda", pipe.backend.dtype)).cpu()
    assert (got - want).abs().max() <= bound * want.abs().max()


@pytest.mark.parametrize("spec, fmt", [("int8", "int8"), ("int4", "nf4")])
def test_quantized_on_the_gpu_matches_transformers(llava_ckpt, test_image, spec, fmt):
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    config = bnb_config(fmt, skip=VLM_SKIP)
    if fmt != "int8":
        config.bnb_4bit_compute_dtype = torch.float16
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(
        llava_ckpt, dtype=torch.float16, quantization_config=config, device_map="cuda"
    ).eval()
    pipe = Pipeline.load(str(llava_ckpt), spec)
    assert pipe.backend.device.type == "cuda" and pipe.backend.dtype == torch.float16
    inputs = _on(reference_inputs(llava_ckpt, [test_image], PROMPT), "cuda", torch.float16)
    with torch.inference_mode():
        want = ref(**inputs).logits.float()
    got = our_logits(pipe, inputs)
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
