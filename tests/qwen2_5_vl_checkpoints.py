"""Builders for tiny random Qwen2.5-VL checkpoints, written by transformers' save_pretrained
with the files the hub repos carry (the tokenizer, template and preprocessor_config.json
of tests/qwen2_vl_checkpoints.py: Qwen2.5-VL's processor is Qwen2-VL's).

Tiny sizes: real 14 px patches of 2 frames, vision width 32 (4 heads), SwiGLU width 48,
4 blocks with full attention in blocks 1 and 3, 56 px windows (2x2 merged blocks, so the
few-dozen-pixel test images have several windows, some cut at the edges); decoder hidden
64, head_dim 16, mrope_section [2, 3, 3]; min_pixels 4 tokens, max_pixels 24 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoints import DEFAULT_WEIGHT_SCALE, _transformers_version, _write_json, randomize_weights_
from tests.family_checkpoints import _chatml_tokenizer_config
from tests.qwen2_vl_checkpoints import reference_processor as qwen2_vl_reference_processor
from tests.qwen2_vl_checkpoints import (
    MAX_PIXELS, MIN_PIXELS, QWEN_VISION_TOKENS, preprocessor_config, train_qwen2_vl_tokenizer,
)
from vlmcli.families.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

WINDOW = 56
FULL_ATTENTION_BLOCKS = [1, 3]


def make_qwen2_5_vl_checkpoint(
    path,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    window_size: int = WINDOW,
    seed: int = 0,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

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
    vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, hidden_act="silu",
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  window_size=window_size, fullatt_block_indexes=FULL_ATTENTION_BLOCKS)
    config = Qwen2_5_VLConfig(
        vision_config=vision, text_config=text,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize_weights_(model, weight_scale, seed)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    tcfg = _chatml_tokenizer_config()
    tcfg["model_max_length"] = 512
    tcfg["extra_special_tokens"] = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    _write_json(path / "tokenizer_config.json", tcfg)
    _write_json(path / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    pre = preprocessor_config(min_pixels, max_pixels)
    pre["processor_class"] = "Qwen2_5_VLProcessor"
    _write_json(path / "preprocessor_config.json", pre)
    _write_json(
        path / "generation_config.json",
        {"eos_token_id": eos, "pad_token_id": pad, "transformers_version": _transformers_version()},
    )
    return path


def reference_processor(path):
    """transformers' Qwen2_5_VLProcessor, as qwen2_vl_checkpoints builds Qwen2-VL's."""
    import transformers

    return qwen2_vl_reference_processor(path, transformers.Qwen2_5_VLProcessor)
