"""LLaVA, LLaVA-NeXT and LLaVA-OneVision: their config.json, read against transformers'
LlavaConfig / LlavaNextConfig / LlavaOnevisionConfig defaults.

    model_type        vision        decoders                     images
    llava             CLIP, SigLIP  Llama, Mistral, Qwen2, Gemma one view each
    llava_next        CLIP, SigLIP  (same)                       anyres tiles
    llava_onevision   SigLIP, CLIP  (same)                       anyres_max_N tiles
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmcli.config import (
    MultiModalConfig,
    ProjectionConfig,
    anyres_from_hf,
    text_default,
    text_from_hf,
    vision_from_hf,
)
from vlmcli.errors import CheckpointError, UnsupportedModelError

# The vision tower each config class implies when config.json has no vision_config.
_CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}
_SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "patch_size": 14,
    "image_size": 384,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
}

# LlavaNextConfig's and LlavaOnevisionConfig's default grids (height, width).
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]

_PROJECTOR_TYPES = {"linear": "linear", "mlp": "mlp", "mlp2x_gelu": "mlp"}


def feature_layers(cfg: dict[str, Any], default: int, n_layers: int) -> tuple[int, ...]:
    layers = cfg.get("vision_feature_layer", default)
    layers = (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers)
    total = n_layers + 1
    if not layers:
        raise CheckpointError("config.json: vision_feature_layer is an empty list")
    for i in layers:
        if not -total <= i < total:
            raise CheckpointError(
                f"config.json: vision_feature_layer {i} is outside the vision tower's {n_layers} layers"
            )
    return layers


def _parse(
    cfg: dict[str, Any],
    *,
    default_vision: dict[str, Any],
    default_text_type: str,
    default_strategy: str,
    default_layer: int,
    default_image_token: int,
    tie_from_text: bool,
    anyres_pinpoints: list[list[int]] | None = None,
    aspect_ratio: str | None = None,
) -> MultiModalConfig:
    # A vision_config dict is read against its own class's defaults; the family's default
    # tower applies only when the config has none (as transformers' sub-config specs do).
    vision_cfg = dict(cfg.get("vision_config") or default_vision)
    vision_cfg.setdefault("model_type", default_vision["model_type"])  # the spec's default type
    vision = vision_from_hf(vision_cfg)
    text_cfg = dict(cfg.get("text_config") or {})
    text_cfg.setdefault("model_type", default_text_type)
    text = text_from_hf(text_cfg)
    # LlavaConfig and LlavaOnevisionConfig take tie_word_embeddings from text_config when
    # the top level does not set it; LlavaNextConfig does not.
    text_tie = text_cfg.get("tie_word_embeddings")
    if text_tie is None:
        text_tie = bool(text_default(text.model_type, "tie_word_embeddings"))
    tie = bool(cfg.get("tie_word_embeddings")) or (tie_from_text and bool(text_tie))
    text = dataclasses.replace(text, tie_word_embeddings=tie)

    layers = feature_layers(cfg, default_layer, vision.n_layers)
    strategy = cfg.get("vision_feature_select_strategy", default_strategy)
    if strategy not in ("default", "full"):
        raise UnsupportedModelError(
            f"vision_feature_select_strategy '{strategy}' is not supported (supported: default, full)"
        )
    anyres = None
    if anyres_pinpoints is not None:
        anyres = anyres_from_hf(cfg, vision, anyres_pinpoints, aspect_ratio)
        if strategy == "full" and vision.class_token:
            raise UnsupportedModelError(
                "anyres tiling with a class token kept (vision_feature_select_strategy 'full' on "
                "a CLIP tower) is not supported: the tiles' features would not form a grid"
            )
    image_token_id = cfg.get("image_token_index", cfg.get("image_token_id", default_image_token))
    projector_type = cfg.get("projector_type") or "mlp"
    if projector_type not in _PROJECTOR_TYPES:
        raise UnsupportedModelError(
            f"projection type '{projector_type}' is not supported (supported: linear, mlp)"
        )
    projection = ProjectionConfig(
        d_vision=vision.d_vision * len(layers),
        d_language=text.d_model,
        projection_type=_PROJECTOR_TYPES[projector_type],
        activation=cfg.get("projector_hidden_act", "gelu"),
        bias=bool(cfg.get("multimodal_projector_bias", True)),
    )
    return MultiModalConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        image_token_id=int(image_token_id),
        vision_feature_layers=layers,
        vision_feature_select_strategy=strategy,
        anyres=anyres,
        raw=cfg,
    )


def parse_llava(cfg: dict[str, Any]) -> MultiModalConfig:
    return _parse(
        cfg,
        default_vision=_CLIP_L_336,
        default_text_type="llama",
        default_strategy="default",
        default_layer=-2,
        default_image_token=32000,
        tie_from_text=True,
    )


def parse_llava_next(cfg: dict[str, Any]) -> MultiModalConfig:
    return _parse(
        cfg,
        default_vision=_CLIP_L_336,
        default_text_type="llama",
        default_strategy="default",
        default_layer=-2,
        default_image_token=32000,
        tie_from_text=False,
        anyres_pinpoints=_NEXT_PINPOINTS,
    )


def parse_llava_onevision(cfg: dict[str, Any]) -> MultiModalConfig:
    return _parse(
        cfg,
        default_vision=_SIGLIP_SO400M_384,
        default_text_type="qwen2",
        default_strategy="full",
        default_layer=-1,
        default_image_token=151646,
        tie_from_text=True,
        anyres_pinpoints=_ONEVISION_PINPOINTS,
        aspect_ratio=cfg.get("vision_aspect_ratio") or "anyres_max_9",
    )
