"""Llama 3.2 Vision's config.json (model_type mllama), read against transformers'
MllamaConfig / MllamaVisionConfig / MllamaTextConfig defaults.

    checkpoints                                       vision                      decoder
    meta-llama/Llama-3.2-11B-Vision(-Instruct)        ViT-H/14 on 560 px tiles    Llama 3.1 8B + 8 cross-attention layers
    meta-llama/Llama-3.2-90B-Vision(-Instruct)        same                        Llama 3.1 70B + 20 cross-attention layers

Images never become tokens: the prompt holds one <|image|> per image, and the decoder's
`cross_attention_layers` (which have no self-attention) attend to the projected vision
states of the images. `num_hidden_layers` counts both kinds of layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlmcli.config import MultiModalConfig, ProjectionConfig, VisionConfig, text_from_hf
from vlmcli.errors import CheckpointError, UnsupportedModelError

# MllamaVisionConfig's defaults (the 11B / 90B tower, except image_size: the hub repos say 560)
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8, attention_heads=16,
    num_channels=3, intermediate_size=5120, vision_output_dim=7680, image_size=448, patch_size=14,
    norm_eps=1e-5, max_num_tiles=4, intermediate_layers_indices=[3, 7, 15, 23, 30],
    supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
)
# MllamaTextConfig's defaults (Llama 3.1 8B with its cross-attention layers)
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40, num_attention_heads=32,
    num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=False, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
)
IMAGE_TOKEN_ID = 128256  # <|image|>: one past the vocabulary, in the embedding's 8 extra rows
# MllamaTextModel's embedding holds vocab_size + 8 rows (the <|image|> token among them);
# lm_head scores vocab_size tokens
EXTRA_EMBEDDINGS = 8


@dataclass(frozen=True)
class MllamaVisionConfig(VisionConfig):
    model_type: str = "mllama_vision_model"
    activation: str = "gelu"
    n_global_layers: int = 8  # the gated blocks run over all tiles of an image after the local ones
    max_num_tiles: int = 4
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)  # local blocks whose outputs are concatenated
    supported_aspect_ratios: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    d_out: int = 7680  # vision_output_dim: d_vision x (1 + len(intermediate_layers))

    @property
    def patches_per_tile(self) -> int:
        """Positions per tile: the patch grid and the class token (1601 at 560 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class MllamaConfig(MultiModalConfig):
    # vision: an MllamaVisionConfig
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)

    def tokens_per_view(self) -> int:
        return 1

    def max_visual_tokens(self) -> int:
        """Prompt tokens per image: the one <|image|> (its tiles reach the decoder through
        cross-attention, not as tokens)."""
        return 1

    def image_tokens(self, height: int, width: int, n_images: int = 1) -> int:
        return 1

    def vision_layers_needed(self) -> int:
        return self.vision.n_layers

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.text.n_layers) if i not in self.cross_attention_layers)

    def validate(self) -> None:
        super().validate()
        v, t = self.vision, self.text
        if sorted(set(self.cross_attention_layers)) != list(self.cross_attention_layers) or any(
            not 0 <= i < t.n_layers for i in self.cross_attention_layers
        ):
            raise CheckpointError(
                f"config.json: cross_attention_layers {list(self.cross_attention_layers)} must be distinct "
                f"increasing layer indices below num_hidden_layers {t.n_layers}"
            )
        if any(not 0 <= i < v.n_layers for i in v.intermediate_layers):
            raise CheckpointError(
                f"config.json: vision intermediate_layers_indices {list(v.intermediate_layers)} must lie "
                f"below num_hidden_layers {v.n_layers}"
            )
        if v.d_out != v.d_vision * (1 + len(v.intermediate_layers)):
            raise CheckpointError(
                f"config.json: vision_output_dim {v.d_out} is not hidden_size {v.d_vision} x "
                f"(1 + {len(v.intermediate_layers)} intermediate layers)"
            )
        if v.image_size % v.patch_size:
            raise CheckpointError(
                f"config.json: vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}"
            )
        if v.max_num_tiles < 1 or any(h * w > v.max_num_tiles or h < 1 or w < 1 for h, w in v.supported_aspect_ratios):
            raise CheckpointError(
                f"config.json: supported_aspect_ratios {[list(a) for a in v.supported_aspect_ratios]} must use "
                f"at most max_num_tiles {v.max_num_tiles} tiles"
            )
        if not 0 <= self.image_token_id < t.vocab_size + EXTRA_EMBEDDINGS:
            raise CheckpointError(
                f"config.json: image_token_index {self.image_token_id} is outside the embedding's "
                f"{t.vocab_size + EXTRA_EMBEDDINGS} rows"
            )
        if t.tie_word_embeddings:
            # the embedding has 8 rows more than lm_head: they cannot be one matrix
            raise UnsupportedModelError("Llama 3.2 Vision with tie_word_embeddings is not supported")


def _int(cfg: dict[str, Any], defaults: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if value is None:
        value = defaults[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise CheckpointError(f"config.json: {where}.{key} must be an integer, not {value!r}")
    return int(value)


def _ints(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise CheckpointError(f"config.json: {key} must be a list of integers, not {value!r}")
    return tuple(value)


def vision_from_hf(cfg: dict[str, Any]) -> MllamaVisionConfig:
    model_type = cfg.get("model_type", "mllama_vision_model")
    if model_type != "mllama_vision_model":
        raise UnsupportedModelError(f"Llama 3.2 Vision with a vision tower of model_type '{model_type}' is not supported")

    def get(key: str) -> int:
        return _int(cfg, _VISION_DEFAULTS, key, "vision_config")

    ratios = cfg.get("supported_aspect_ratios") or _VISION_DEFAULTS["supported_aspect_ratios"]
    if not isinstance(ratios, list) or not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in ratios):
        raise CheckpointError(f"config.json: vision_config.supported_aspect_ratios must be [h, w] pairs, not {ratios!r}")
    # transformers' image_size may be a list (square tiles only in every checkpoint)
    size = cfg.get("image_size", _VISION_DEFAULTS["image_size"])
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UnsupportedModelError(f"Llama 3.2 Vision with non-square tiles {list(size)} is not supported")
        size = size[0]
    patch = cfg.get("patch_size", _VISION_DEFAULTS["patch_size"])
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return MllamaVisionConfig(
        image_size=int(size),
        patch_size=int(patch),
        d_vision=get("hidden_size"),
        n_layers=get("num_hidden_layers"),
        n_heads=_int(cfg, {"attention_heads": cfg.get("num_attention_heads") or 16}, "attention_heads", "vision_config"),
        d_ff=get("intermediate_size"),
        norm_eps=float(cfg.get("norm_eps", _VISION_DEFAULTS["norm_eps"])),
        activation=str(cfg.get("hidden_act") or "gelu"),
        num_channels=get("num_channels"),
        class_token=True,
        pre_layernorm=True,
        n_global_layers=get("num_global_layers"),
        max_num_tiles=get("max_num_tiles"),
        intermediate_layers=_ints(
            cfg.get("intermediate_layers_indices") or _VISION_DEFAULTS["intermediate_layers_indices"],
            "vision_config.intermediate_layers_indices",
        ),
        supported_aspect_ratios=tuple((int(h), int(w)) for h, w in ratios),
        d_out=get("vision_output_dim"),
    )


def _text_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    text = dict(cfg.get("text_config") or {})
    for key, value in _TEXT_DEFAULTS.items():
        if text.get(key) is None:
            text[key] = value
    text.pop("head_dim", None)  # MllamaTextConfig has none: hidden_size / heads
    text["model_type"] = "llama"  # a Llama 3.1 decoder, llama3 RoPE scaling and all
    return text


def parse_mllama(cfg: dict[str, Any]) -> MllamaConfig:
    vision = vision_from_hf(dict(cfg.get("vision_config") or {}))
    text_cfg = _text_dict(cfg)
    text = text_from_hf(text_cfg)
    text = dataclasses.replace(text, tie_word_embeddings=bool(text_cfg.get("tie_word_embeddings")))
    projection = ProjectionConfig(
        d_vision=vision.d_out,
        d_language=text.d_model,
        # one Linear into the decoder's width, read by the decoder's cross-attention layers
        # (not the seed's cross_attention resampler, which makes tokens: Qwen-VL)
        projection_type="decoder_cross_attention",
        activation="none",
        bias=True,
    )
    return MllamaConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        image_token_id=int(cfg.get("image_token_index", cfg.get("image_token_id", IMAGE_TOKEN_ID))),
        # what `vlm info` shows: the intermediate local blocks and the last (global) one
        vision_feature_layers=(*vision.intermediate_layers, -1),
        vision_feature_select_strategy="full",
        raw=cfg,
        cross_attention_layers=_ints(text_cfg["cross_attention_layers"], "text_config.cross_attention_layers"),
    )
