"""Builders for tiny random Qwen2-VL checkpoints, written by transformers' save_pretrained
with the processor files the hub repos carry:

    config.json (Qwen2VLConfig: vision_config + text_config with M-RoPE), model.safetensors,
    tokenizer.json (the tiny ChatML tokenizer of tests/family_checkpoints.py plus Qwen's
    vision tokens), tokenizer_config.json, chat_template.json (the hub template) and
    preprocessor_config.json (Qwen2VLImageProcessor, CLIP statistics).

Tiny sizes: real 14 px patches of 2 frames, vision width 32 (4 heads), 2 blocks; decoder
hidden 64, head_dim 16, mrope_section [2, 3, 3]; min_pixels 4 tokens, max_pixels 24
tokens, so images of a few dozen pixels give grids of different shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoints import DEFAULT_WEIGHT_SCALE, _transformers_version, _write_json, randomize_weights_
from tests.family_checkpoints import _chatml_tokenizer_config, train_chatml_tokenizer
from vlmcli.families.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 24


def train_qwen2_vl_tokenizer():
    from tokenizers import AddedToken

    tok = train_chatml_tokenizer()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_VISION_TOKENS])
    return tok


def preprocessor_config(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> dict:
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "merge_size": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 1 / 255,
    }


def make_qwen2_vl_checkpoint(
    path,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    text_overrides: dict | None = None,
    seed: int = 0,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_qwen2_vl_tokenizer()
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    ids = {t: tok.token_to_id(t) for t in QWEN_VISION_TOKENS}
    text = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    )
    text.update(text_overrides or {})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, hidden_act="quick_gelu",
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(
        vision_config=vision, text_config=text,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    randomize_weights_(model, weight_scale, seed)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    tcfg = _chatml_tokenizer_config()
    tcfg["model_max_length"] = 512
    tcfg["extra_special_tokens"] = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    _write_json(path / "tokenizer_config.json", tcfg)
    _write_json(path / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    _write_json(path / "preprocessor_config.json", preprocessor_config(min_pixels, max_pixels))
    _write_json(
        path / "generation_config.json",
        {"eos_token_id": eos, "pad_token_id": pad, "transformers_version": _transformers_version()},
    )
    return path


def reference_processor(path, processor_class=None):
    """transformers' Qwen2VLProcessor, or the Qwen2.5-VL one given (Pillow image backend, no
    video processor: that needs torchvision)."""
    import json

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class _ImageOnly(processor_class or transformers.Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    path = Path(path)
    return _ImageOnly(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
        video_processor=None,
        chat_template=json.loads((path / "chat_template.json").read_text())["chat_template"],
    )
