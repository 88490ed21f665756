"""Qwen2-VL's config.json, read against transformers' Qwen2VLConfig defaults.

Two layouts: the hub repos' (Qwen/Qwen2-VL-2B-Instruct, written by transformers 4.45: the
decoder's keys at the top level, `rope_scaling: {"type": "mrope", "mrope_section": [...]}`,
vision keys `in_chans`, `spatial_patch_size`) and transformers 5's (`text_config` nested,
`rope_parameters`).

    vision_config   a ViT over 14 px patches of 2 frames (a still image repeated): a Conv3d
                    patch embedding without bias, `depth` blocks of LayerNorm + attention
                    with 2-D RoPE + LayerNorm + MLP (quick_gelu), no class token; then the
                    merger: LayerNorm, 2x2 neighbouring patches concatenated, MLP to the
                    decoder's width (`hidden_size`)
    decoder         Qwen2 with multimodal RoPE: head_dim/2 frequencies cut into
                    `mrope_section` runs for the temporal, height and width positions
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlmcli.config import MultiModalConfig, ProjectionConfig, VisionConfig, text_from_hf
from vlmcli.errors import CheckpointError, UnsupportedModelError

# transformers' Qwen2VLVisionConfig defaults
_VISION_DEFAULTS: dict[str, Any] = dict(
    depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
    in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)
# transformers' Qwen2VLTextConfig defaults (what a sparse config leaves out)
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
    num_attention_heads=64, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-5, use_sliding_window=False, sliding_window=4096, max_window_layers=80,
    rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645,
)
# the vision config keys that are not the decoder's, for the flat (4.x) layout
_TOP_LEVEL_ONLY = ("vision_config", "text_config", "image_token_id", "video_token_id", "vision_start_token_id",
                   "vision_end_token_id", "vision_token_id", "architectures", "model_type")
DEFAULT_MROPE_SECTION = (16, 24, 24)
# Qwen2VLImageProcessor's class defaults
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True)
class Qwen2VisionConfig(VisionConfig):
    model_type: str = "qwen2_vl_vision"
    activation: str = "quick_gelu"
    class_token: bool = False
    pre_layernorm: bool = False
    norm_eps: float = 1e-6
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    d_out: int = 1536  # the merger's output: the decoder's width
    rope_theta: float = 10000.0
    # Qwen2.5-VL's tower: RMSNorm and a SwiGLU MLP, and attention within windows of
    # window_size px except in the fullatt_block_indexes blocks (0: whole images everywhere)
    norm: str = "layer"  # layer | rms
    gated_mlp: bool = False
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x frames x patch x patch."""
        return self.num_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class Qwen2VLConfig(MultiModalConfig):
    mrope_section: tuple[int, ...] = DEFAULT_MROPE_SECTION
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def factor(self) -> int:
        """Pixels per visual token side: patch x merge (28)."""
        return self.vision.patch_size * self.vision.spatial_merge_size

    def tokens_per_view(self) -> int:
        return self.max_visual_tokens()

    def max_visual_tokens(self) -> int:
        return max(1, self.max_pixels // self.factor**2)

    def image_tokens(self, height: int, width: int, n_images: int = 1) -> int:
        from vlmcli.families.qwen2_vl.processor import smart_resize

        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return (h // self.factor) * (w // self.factor)

    def vision_layers_needed(self) -> int:
        return self.vision.n_layers

    def validate(self) -> None:
        super().validate()
        t = self.text
        if 2 * sum(self.mrope_section) != t.head_dim:
            raise CheckpointError(
                f"config.json: mrope_section {list(self.mrope_section)} must sum to head_dim / 2 ({t.head_dim // 2})"
            )
        v = self.vision
        if (v.d_vision // v.n_heads) % 4:
            raise CheckpointError("config.json: the vision head size must be a multiple of 4 (2-D RoPE)")
        if self.projection.d_language != t.d_model:
            raise CheckpointError(
                f"config.json: vision_config.hidden_size {self.projection.d_language} is not the decoder's {t.d_model}"
            )


def vision_int(cfg: dict[str, Any], defaults: dict[str, Any], *keys: str) -> int:
    """The first of `keys` the vision config sets (else the first key's default), checked to
    be an integer; Qwen2.5-VL reads its tower with its own defaults."""
    for key in keys:
        if cfg.get(key) is not None:
            value = cfg[key]
            break
    else:
        value = defaults[keys[0]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise CheckpointError(f"config.json: vision_config.{keys[0]} must be an integer, not {value!r}")
    return int(value)


def vision_from_hf(cfg: dict[str, Any]) -> Qwen2VisionConfig:
    model_type = cfg.get("model_type", "qwen2_vl")
    if model_type not in ("qwen2_vl", "qwen2_vl_vision"):
        raise UnsupportedModelError(f"vision tower of model_type '{model_type}' is not supported in Qwen2-VL")
    d = vision_int(cfg, _VISION_DEFAULTS, "embed_dim")
    ratio = cfg.get("mlp_ratio", _VISION_DEFAULTS["mlp_ratio"])
    patch = vision_int(cfg, _VISION_DEFAULTS, "patch_size", "spatial_patch_size")
    merge = vision_int(cfg, _VISION_DEFAULTS, "spatial_merge_size")
    rope = cfg.get("rope_parameters") or {}
    return Qwen2VisionConfig(
        image_size=patch * merge,  # no fixed input size; the smallest image is one token
        patch_size=patch,
        d_vision=d,
        n_layers=vision_int(cfg, _VISION_DEFAULTS, "depth"),
        n_heads=vision_int(cfg, _VISION_DEFAULTS, "num_heads"),
        d_ff=int(d * float(ratio)),
        activation=str(cfg.get("hidden_act") or _VISION_DEFAULTS["hidden_act"]),
        num_channels=vision_int(cfg, _VISION_DEFAULTS, "in_channels", "in_chans"),
        temporal_patch_size=vision_int(cfg, _VISION_DEFAULTS, "temporal_patch_size"),
        spatial_merge_size=merge,
        d_out=vision_int(cfg, _VISION_DEFAULTS, "hidden_size"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def _text_dict(cfg: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The decoder's keys as a Qwen2 config dict, and the mrope_section taken out of its RoPE."""
    nested = cfg.get("text_config")
    if isinstance(nested, dict) and nested:
        text = dict(nested)
    else:
        text = {k: v for k, v in cfg.items() if k not in _TOP_LEVEL_ONLY}
    for key, value in _TEXT_DEFAULTS.items():
        if text.get(key) is None and key not in ("sliding_window",):
            text[key] = value
    section = DEFAULT_MROPE_SECTION
    for key in ("rope_scaling", "rope_parameters"):
        params = text.get(key)
        if isinstance(params, dict):
            params = dict(params)
            if params.get("mrope_section") is not None:
                section = tuple(int(n) for n in params.pop("mrope_section"))
            kind = params.get("rope_type") or params.get("type")
            if kind in ("mrope", "default", None):
                params.pop("type", None)
                params["rope_type"] = "default"
            params.pop("mrope_interleaved", None)
            text[key] = params
    text["model_type"] = "qwen2"
    return text, section


def parse_qwen2_vl(cfg: dict[str, Any]) -> Qwen2VLConfig:
    vision = vision_from_hf(dict(cfg.get("vision_config") or {}))
    text_cfg, section = _text_dict(cfg)
    text = text_from_hf(text_cfg)
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = text_cfg.get("tie_word_embeddings", False)
    text = dataclasses.replace(text, tie_word_embeddings=bool(tie))
    merge = vision.spatial_merge_size
    projection = ProjectionConfig(
        d_vision=vision.d_vision * merge * merge,
        d_language=vision.d_out,
        projection_type="mlp",
        activation="gelu",
        bias=True,
    )
    return Qwen2VLConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        image_token_id=int(cfg.get("image_token_id", 151655)),
        vision_feature_layers=(-1,),
        vision_feature_select_strategy="full",
        raw=cfg,
        mrope_section=section,
        vision_start_token_id=int(cfg.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(cfg.get("vision_end_token_id", 151653)),
    )
