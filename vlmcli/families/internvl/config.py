"""InternVL's config.json (transformers' `internvl` layout: OpenGVLab/InternVL3-*-hf), read
against transformers' InternVLConfig / InternVLVisionConfig defaults.

    vision_config   InternViT (model_type internvl_vision): a ViT with a [CLS] token, learned
                    absolute positions, layer scale (lambda_1 / lambda_2), layer norm or RMS
                    norm, optional QK-norm; no pre-layernorm
    text_config     Qwen2 (the default), or any decoder vlmcli.config parses
    top level       downsample_ratio (0.5: pixel shuffle of 2x2 features into one), the
                    feature layer (-1) and strategy ("default" drops [CLS]), image_token_id
                    (<IMG_CONTEXT>, 151667), projector_hidden_act (gelu)

Each tile (448 px, 14 px patches: 32 x 32 = 1024 patches) becomes (32 * 0.5)^2 = 256 visual
tokens after the pixel shuffle.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vlmcli.config import MultiModalConfig, ProjectionConfig, VisionConfig, text_from_hf
from vlmcli.errors import CheckpointError, UnsupportedModelError

VISION_MODEL_TYPE = "internvl_vision"

# transformers' InternVLVisionConfig defaults (what a sparse vision_config omits).
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    attention_bias=False,
    use_qk_norm=False,
    intermediate_size=4096,
    hidden_act="gelu",
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    image_size=448,
    patch_size=14,
    num_channels=3,
    use_mask_token=False,
    use_absolute_position_embeddings=True,
    use_mean_pooling=True,
)

# GotOcr2ImageProcessor's tiling defaults, which InternVLProcessor turns on (crop_to_patches)
DEFAULT_MIN_TILES = 1
DEFAULT_MAX_TILES = 12

NORM_TYPES = ("layer_norm", "rms_norm")


@dataclass(frozen=True)
class InternVisionConfig(VisionConfig):
    """InternViT: VisionConfig's fields (class_token on, no pre-layernorm, a bias on the
    patch conv) and what InternViT adds."""

    model_type: str = VISION_MODEL_TYPE
    activation: str = "gelu"
    class_token: bool = True
    pre_layernorm: bool = False
    patch_bias: bool = True
    norm_type: str = "layer_norm"  # layer_norm (InternVL3-1B/2B/8B) or rms_norm (InternViT-6B)
    qk_norm: bool = False  # an RMSNorm over q and k (whole width) before the heads split
    attention_bias: bool = False  # on q/k/v (the output projection always has one)
    absolute_positions: bool = True
    # False: transformers applies a final LayerNorm to last_hidden_state (feature layer -1)
    mean_pooling: bool = True


@dataclass(frozen=True)
class InternVLConfig(MultiModalConfig):
    downsample_ratio: float = 0.5
    # the tile count the processor allows by default (for max_visual_tokens and image_tokens);
    # the processor itself reads min_patches / max_patches from the checkpoint's settings
    min_tiles: int = DEFAULT_MIN_TILES
    max_tiles: int = DEFAULT_MAX_TILES

    @property
    def shuffle(self) -> int:
        """Features per side merged into one token (2 for downsample_ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def feature_layer(self) -> int:
        return self.vision_feature_layers[0]

    def tokens_per_view(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return (side // self.shuffle) ** 2

    def tiles(self, height: int, width: int) -> int:
        """Views an image gets with the default tile limits: its grid's tiles and, when
        there are several, a thumbnail."""
        from vlmcli.families.internvl.processor import tile_grid

        size = self.vision.image_size
        cols, rows = tile_grid((height, width), (size, size), self.min_tiles, self.max_tiles)
        return 1 if cols * rows == 1 or self.max_tiles <= 1 else cols * rows + 1

    def image_tokens(self, height: int, width: int, n_images: int = 1) -> int:
        return self.tokens_per_view() * self.tiles(height, width)

    def max_visual_tokens(self) -> int:
        """An upper bound per image: the most tiles allowed, plus the thumbnail."""
        views = self.max_tiles + 1 if self.max_tiles > 1 else 1
        return self.tokens_per_view() * views

    def validate(self) -> None:
        super().validate()
        v = self.vision
        ratio = self.downsample_ratio
        if not (isinstance(ratio, float) and math.isfinite(ratio) and 0 < ratio <= 1):
            raise CheckpointError(f"config.json: downsample_ratio must be a number in (0, 1], not {ratio!r}")
        k = self.shuffle
        if abs(1 / ratio - k) > 1e-9:
            raise UnsupportedModelError(
                f"downsample_ratio {ratio} is not supported (supported: 1/k for a whole k, as 0.5)"
            )
        side = v.image_size // v.patch_size
        if v.image_size % v.patch_size or side % k:
            raise CheckpointError(
                f"config.json: the vision tower's {side} x {side} patches of {v.patch_size} px over "
                f"{v.image_size} px do not fold into {k} x {k} groups (downsample_ratio {ratio})"
            )
        if self.projection.d_vision != v.d_vision * k * k:
            raise CheckpointError("config.json: the projector's input width is not the shuffled vision width")


def _square(value: Any, name: str) -> int:
    """image_size / patch_size as an int, or a [h, w] pair that must be square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise CheckpointError(f"config.json: vision_config.{name} must be a number or [height, width], not {value!r}")
        h, w = value
        if h != w:
            raise UnsupportedModelError(f"a non-square vision_config.{name} {list(value)} is not supported")
        value = h
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"config.json: vision_config.{name} must be an integer, not {value!r}")
    return value


def _get(cfg: dict[str, Any], key: str) -> Any:
    value = cfg.get(key)
    return _VISION_DEFAULTS[key] if value is None else value


def vision_from_hf(cfg: dict[str, Any]) -> InternVisionConfig:
    model_type = cfg.get("model_type", VISION_MODEL_TYPE)
    if model_type != VISION_MODEL_TYPE:
        raise UnsupportedModelError(
            f"vision tower of model_type '{model_type}' is not supported in InternVL (supported: {VISION_MODEL_TYPE})"
        )
    norm_type = _get(cfg, "norm_type")
    if norm_type not in NORM_TYPES:
        raise UnsupportedModelError(f"vision norm_type '{norm_type}' is not supported (supported: {', '.join(NORM_TYPES)})")
    return InternVisionConfig(
        image_size=_square(_get(cfg, "image_size"), "image_size"),
        patch_size=_square(_get(cfg, "patch_size"), "patch_size"),
        d_vision=int(_get(cfg, "hidden_size")),
        n_layers=int(_get(cfg, "num_hidden_layers")),
        n_heads=int(_get(cfg, "num_attention_heads")),
        d_ff=int(_get(cfg, "intermediate_size")),
        norm_eps=float(_get(cfg, "layer_norm_eps")),
        activation=_get(cfg, "hidden_act"),
        num_channels=int(_get(cfg, "num_channels")),
        norm_type=norm_type,
        qk_norm=bool(_get(cfg, "use_qk_norm")),
        attention_bias=bool(_get(cfg, "attention_bias")),
        absolute_positions=bool(_get(cfg, "use_absolute_position_embeddings")),
        mean_pooling=bool(_get(cfg, "use_mean_pooling")),
    )


def parse_internvl(cfg: dict[str, Any]) -> InternVLConfig:
    vision = vision_from_hf(dict(cfg.get("vision_config") or {}))
    text_cfg = dict(cfg.get("text_config") or {})
    text_cfg.setdefault("model_type", "qwen2")  # InternVLConfig's sub-config spec
    text = text_from_hf(text_cfg)
    # transformers 5 ties lm_head by InternVLConfig's own tie_word_embeddings (default true).
    # Configs written by 4.x may leave that out and say it in text_config only (a separate
    # lm_head for InternVL3-8B's Qwen2.5-7B): that explicit value is kept then.
    tie = cfg.get("tie_word_embeddings")
    if tie is None:
        tie = text_cfg.get("tie_word_embeddings", True)
    text = dataclasses.replace(text, tie_word_embeddings=bool(tie))

    layer = cfg.get("vision_feature_layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int):
        # transformers indexes hidden_states with it; a list of layers is not supported there
        raise UnsupportedModelError(f"vision_feature_layer {layer!r} is not supported in InternVL (one layer index)")
    total = vision.n_layers + 1
    if not -total <= layer < total:
        raise CheckpointError(f"config.json: vision_feature_layer {layer} is outside the vision tower's {vision.n_layers} layers")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        # "full" keeps [CLS]: 1 + n^2 features do not form the square the pixel shuffle needs
        raise UnsupportedModelError(
            f"vision_feature_select_strategy '{strategy}' is not supported in InternVL (supported: default)"
        )
    ratio = cfg.get("downsample_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise CheckpointError(f"config.json: downsample_ratio must be a number, not {ratio!r}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise CheckpointError(f"config.json: downsample_ratio must be a number in (0, 1], not {ratio!r}")
    k = round(1 / ratio)
    projection = ProjectionConfig(
        d_vision=vision.d_vision * k * k,
        d_language=text.d_model,
        projection_type="mlp",  # LayerNorm, then linear_1, act, linear_2
        activation=cfg.get("projector_hidden_act", "gelu"),
        bias=True,
    )
    return InternVLConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        image_token_id=int(cfg.get("image_token_id", cfg.get("image_token_index", 151667))),
        vision_feature_layers=(layer,),
        vision_feature_select_strategy=strategy,
        raw=cfg,
        downsample_ratio=ratio,
    )
