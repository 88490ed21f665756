"""PaliGemma's config.json, read against transformers' PaliGemmaConfig defaults.

    checkpoints                                   vision              decoder
    google/paligemma-3b-{pt,mix}-{224,448,896}    SigLIP so400m/14    Gemma 2B (18 layers)
    google/paligemma2-{3b,10b,28b}-{pt,mix}-*     SigLIP so400m/14    Gemma2 (26 / 42 / 46 layers)

One image is (image_size / patch_size)^2 tokens (256 at 224 px, 1024 at 448 px): SigLIP's
last hidden state (after its post_layernorm), through one linear projection, scattered over
the <image> slots unscaled (transformers 5 scales the text embeddings by sqrt(d) in the
embedding itself; transformers 4 divided the image features by sqrt(d) before a global
scale, which comes to the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmcli.config import MultiModalConfig, ProjectionConfig, text_from_hf, vision_from_hf
from vlmcli.errors import UnsupportedModelError

# PaliGemmaConfig's sub-config defaults: used only when config.json has no such sub-config
# (a sub-config dict is read against its own class's defaults, as in transformers).
_DEFAULT_VISION = {
    "model_type": "siglip_vision_model",
    "intermediate_size": 4096,
    "hidden_size": 1152,
    "patch_size": 14,
    "image_size": 224,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
}
_DEFAULT_TEXT = {
    "model_type": "gemma",
    "hidden_size": 2048,
    "num_hidden_layers": 18,
    "intermediate_size": 16384,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "vocab_size": 257152,
}
_DECODERS = ("gemma", "gemma2")


def parse_paligemma(cfg: dict[str, Any]) -> MultiModalConfig:
    vision_cfg = dict(cfg.get("vision_config") or _DEFAULT_VISION)
    vision_cfg.setdefault("model_type", "siglip_vision_model")
    if vision_cfg["model_type"] != "siglip_vision_model":
        raise UnsupportedModelError(
            f"PaliGemma with a vision tower of model_type '{vision_cfg['model_type']}' is not supported "
            "(supported: siglip_vision_model)"
        )
    vision = vision_from_hf(vision_cfg)
    text_cfg = dict(cfg.get("text_config") or _DEFAULT_TEXT)
    text_cfg.setdefault("model_type", "gemma")
    if text_cfg["model_type"] not in _DECODERS:
        raise UnsupportedModelError(
            f"PaliGemma with a decoder of model_type '{text_cfg['model_type']}' is not supported "
            f"(supported: {', '.join(_DECODERS)})"
        )
    text = text_from_hf(text_cfg)
    # PaliGemmaForConditionalGeneration ties lm_head to the embeddings by the top-level
    # tie_word_embeddings (default true); every released checkpoint stores no lm_head.
    tie = cfg.get("tie_word_embeddings")
    text = dataclasses.replace(text, tie_word_embeddings=True if tie is None else bool(tie))
    projection = ProjectionConfig(
        d_vision=vision.d_vision,
        d_language=text.d_model,
        projection_type="linear",
        bias=True,
    )
    # the projector's output width is projection_dim (PaliGemmaConfig: 2048); it must be the
    # decoder's width, or transformers could not scatter the features either
    projection_dim = int(cfg.get("projection_dim", 2048))
    if projection_dim != text.d_model:
        raise UnsupportedModelError(
            f"config.json: projection_dim {projection_dim} differs from the decoder's hidden_size {text.d_model}"
        )
    return MultiModalConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        image_token_id=int(cfg.get("image_token_index", cfg.get("image_token_id", 256000))),
        vision_feature_layers=(-1,),
        vision_feature_select_strategy="full",
        raw=cfg,
    )
