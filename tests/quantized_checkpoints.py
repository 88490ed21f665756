"""bitsandbytes-quantized checkpoints written by transformers itself, and the reference runs
the quantized tests compare against.

transformers 5.24 quantizes with bitsandbytes on the CPU (`device_map="cpu"`) and its
`save_pretrained` writes the serialization every pre-quantized hub repo carries; these
helpers make such checkpoints from the tiny random LLaVAs of tests/checkpoints.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# The modules vlm leaves unquantized, in the names transformers 5 matches (see
# vlmcli/families/llava/weights.py: HF_SKIP_MODULES, and vlmcli/quantization.py: HF_LM_HEAD).
VLM_SKIP = ["model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector", "lm_head"]
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def bnb_config(fmt: str, *, double_quant: bool = False, skip: list[str] | None = VLM_SKIP, threshold: float = 6.0):
    """transformers' BitsAndBytesConfig for int8 / nf4 / fp4, computing in fp32 on the CPU.
    skip=None is transformers' own default (only lm_head stays unquantized)."""
    from transformers import BitsAndBytesConfig

    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_threshold=threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=fmt,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )


def load_reference(path, quantization_config=None):
    """transformers' LLaVA on the CPU in fp32: plain, quantized while loading, or pre-quantized.

    On a CPU with AVX512-BF16, bitsandbytes' packed 4-bit kernel cannot take a layer whose
    outputs are not a multiple of 32 or inputs not a multiple of 64 (most of these tiny
    models' layers), and transformers fails on its first forward there. Such layers are
    kept on bitsandbytes' generic path, as vlm keeps its own (backends/bnb.py); the others
    take the packed kernel in both. Elsewhere this changes nothing."""
    import transformers

    from backends.bnb import keep_off_packed_path

    kwargs = {"device_map": "cpu"} if quantization_config is not None else {}
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, quantization_config=quantization_config, **kwargs
    ).eval()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            keep_off_packed_path(module)
    return model


def save_with_transformers(src: Path, out: Path, quantization_config) -> Path:
    """Quantize `src` while loading it with transformers, then save_pretrained to `out` (the
    tokenizer and processor files copied along, as a hub repo would carry them)."""
    model = load_reference(src, quantization_config)
    model.save_pretrained(out)
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def reference_inputs(path, images, prompt="What is in the picture?"):
    """transformers' processor output for one user turn with `images` and `prompt`."""
    import transformers
    from PIL import Image

    from vlmcli.sequence import user_message

    processor = transformers.AutoProcessor.from_pretrained(path)
    owner = processor if processor.chat_template else processor.tokenizer
    text = owner.apply_chat_template([user_message(prompt, len(images))], add_generation_prompt=True, tokenize=False)
    pil = [Image.open(p).convert("RGB") for p in images]
    return processor(text=text, images=pil or None, return_tensors="pt")


def our_logits(pipe, inputs) -> torch.Tensor:
    """Our logits at every position for the same ids and pixels transformers got."""
    ids = inputs["input_ids"]
    pixels = inputs.get("pixel_values")
    with torch.inference_mode():
        return pipe.model(ids, pixels, pipe.model.decoder.new_cache(ids.shape[1]), last_only=False).float()


def greedy_reference(model, inputs, n: int, stop_ids) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in stop_ids]


def divergence(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far quantized logits are from reference logits (B, T, V), over every position:
    max |diff| / max |ref|, mean and max KL(ref || ours) in nats, top-1 agreement."""
    ours, ref = ours.float().flatten(0, -2), ref.float().flatten(0, -2)
    rp, op = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    kl = (rp.exp() * (rp - op)).sum(-1)
    return {
        "max_rel": ((ours - ref).abs().max() / ref.abs().max()).item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "top1": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def quantized_module_names(model: torch.nn.Module) -> dict[str, str]:
    """module name -> class name, for every bitsandbytes Linear in `model`."""
    return {
        name: type(m).__name__ for name, m in model.named_modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")
    }
