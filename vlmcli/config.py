"""Model configuration: the seed's fields, read from a Hugging Face `config.json`.

Three parts, one per stage of the pipeline (vision encoder, projection, language decoder),
and MultiModalConfig to hold them together. Each part is parsed from its own sub-config and
dispatched on its own `model_type`: the vision towers and decoders parsed here are shared by
the families (vlmcli/families/), which put them together.

Defaults are the ones `transformers` applies when a key is absent: real checkpoints
(llava-hf/llava-1.5-7b-hf among them) write only the keys that differ from those defaults,
and each architecture has its own (a Mistral config without `sliding_window` means 4096, a
Gemma one without `head_dim` means 256), so the tables below are per `model_type`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlmcli import anyres
from vlmcli.errors import CheckpointError, UnsupportedModelError


@dataclass(frozen=True)
class VisionConfig:
    """A ViT encoder: image -> (num_patches [+1], d_vision) features."""

    model_type: str = "clip_vision_model"
    image_size: int = 224  # square input side the position embeddings were trained for
    patch_size: int = 32  # side of one patch; the patch embedding is a conv with this stride
    d_vision: int = 768  # width of the residual stream
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072  # hidden width of each block's MLP
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # CLIP was trained with x * sigmoid(1.702 x); SigLIP uses GELU-tanh
    num_channels: int = 3
    class_token: bool = True  # CLIP prepends a learned [CLS]; SigLIP has none
    pre_layernorm: bool = True  # CLIP normalises the embeddings before block 1; SigLIP does not
    patch_bias: bool = False  # SigLIP's patch-embedding conv has a bias, CLIP's has none

    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def num_positions(self) -> int:
        return self.num_patches() + (1 if self.class_token else 0)

    @property
    def head_dim(self) -> int:
        return self.d_vision // self.n_heads


@dataclass(frozen=True)
class ProjectionConfig:
    """Maps vision features into the decoder's embedding space."""

    d_vision: int  # input width: d_vision times the number of feature layers concatenated
    d_language: int  # the decoder's d_model
    d_hidden: int | None = None  # MLP hidden width; None means d_language (LLaVA-1.5)
    # linear (LLaVA v1) | mlp (LLaVA-1.5) | cross_attention (a resampler) | decoder_cross_attention
    # (Llama 3.2 Vision: a Linear whose output the decoder's cross-attention layers read)
    projection_type: str = "mlp"
    activation: str = "gelu"
    bias: bool = True

    @property
    def hidden(self) -> int:
        return self.d_hidden if self.d_hidden is not None else self.d_language


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base period and an optional scaling of the frequencies.

    `rope_type` is one of transformers' names: default, linear, dynamic (NTK), yarn, llama3.
    `params` holds that type's settings as the config gives them (factor, low_freq_factor,
    original_max_position_embeddings, beta_fast, ...), after transformers' standardisation.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class TextConfig:
    """A LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, gated MLP).

    Llama, Mistral, Qwen2, Gemma and Gemma2 differ only in the switches below."""

    model_type: str = "llama"
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # fewer than n_heads means grouped-query attention
    head_dim: int = 128
    d_ff: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only; Llama's attention_bias sets both
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # the gate's activation: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)
    # Mistral: every layer sees only the last `sliding_window` keys. Qwen2: the layers its
    # `layer_types` marks "sliding_attention" (sliding_layers), else those from
    # max_window_layers on (sliding_from).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    sliding_from: int = 0
    embedding_multiplier: float = 1.0  # Gemma scales token embeddings by sqrt(d_model)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    # Gemma2: scores scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5), then
    # soft-capped (cap * tanh(s / cap)); logits soft-capped the same way; and each block's
    # attention and MLP outputs normalised before the residual add ("sandwich" norms).
    attention_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sandwich_norms: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """The RoPE scaling settings as a dict (None for plain RoPE)."""
        if self.rope.rope_type == "default":
            return None
        return {"rope_type": self.rope.rope_type, **dict(self.rope.params)}

    @property
    def context_length(self) -> int:
        """Longest sequence the decoder is meant for. Dynamic NTK scaling stretches the
        trained length by its factor at run time; every other type states the final length
        in max_position_embeddings."""
        if self.rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * float(self.rope.get("factor", 1.0)))
        return self.max_position_embeddings

    def window_for(self, layer: int) -> int | None:
        if self.sliding_layers is not None:
            return self.sliding_window if layer in self.sliding_layers else None
        return self.sliding_window if layer >= self.sliding_from else None


@dataclass(frozen=True)
class AnyresConfig:
    """LLaVA-NeXT / OneVision high-resolution input: a base view plus tiles of a best grid.

    Every tile and the base view are `tile` pixels square (the vision tower's input size).
    The tiles' features are stitched back into one feature map, cropped to the image's
    aspect ratio ("unpadding"), optionally shrunk to about `max_tiles` tiles' worth of
    features (OneVision's anyres_max_N), and each row ends with the learned image_newline.
    """

    grid_pinpoints: tuple[tuple[int, int], ...]  # candidate (height, width) resolutions
    tile: int  # pixels per tile side: the vision tower's image_size
    patches_per_side: int  # features per tile side: image_size // patch_size
    max_tiles: int | None = None  # OneVision's anyres_max_N; None for LLaVA-NeXT
    # OneVision: an image that shares its prompt with other images gets the base view only
    # (padded to a square), followed by a single image_newline.
    base_only_when_several: bool = False


@dataclass(frozen=True)
class MultiModalConfig:
    model_type: str
    vision: VisionConfig
    projection: ProjectionConfig
    text: TextConfig
    image_token_id: int
    # hidden_states indices of the vision tower to use (0 = embeddings, i = after block i;
    # negative counts from the end as in Python). Several are concatenated on the last dim.
    vision_feature_layers: tuple[int, ...] = (-2,)
    # default drops the first position ([CLS] for CLIP; for a tower without one, transformers
    # drops the first patch all the same); full keeps everything
    vision_feature_select_strategy: str = "default"
    anyres: AnyresConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def tokens_per_view(self) -> int:
        """Visual tokens one vision-tower pass (one image, or one tile) yields."""
        n = self.vision.num_positions()
        return n - 1 if self.vision_feature_select_strategy == "default" else n

    def max_visual_tokens(self) -> int:
        """Visual tokens per image: exact for a plain LLaVA; for anyres families an upper
        bound (the largest grid, before unpadding), since the count depends on the image."""
        if self.anyres is None:
            return self.tokens_per_view()
        return max(self.image_tokens(h, w) for h, w in self.anyres.grid_pinpoints)

    def image_tokens(self, height: int, width: int, n_images: int = 1) -> int:
        """Visual tokens an image of `height` x `width` pixels becomes, in a prompt holding
        `n_images` images (OneVision treats images differently when there are several)."""
        base = self.tokens_per_view()
        a = self.anyres
        if a is None:
            return base
        if a.base_only_when_several and n_images > 1:
            return base + 1  # the base view and one image_newline
        rows, cols = anyres.feature_grid(
            (height, width), a.grid_pinpoints, a.tile, a.patches_per_side, a.max_tiles
        )
        return base + rows * cols + rows  # every row of the grid ends with image_newline

    def vision_layers_needed(self) -> int:
        """How many encoder blocks must run: the deepest selected hidden state."""
        total = self.vision.n_layers + 1  # hidden_states has embeddings + one per block
        return max(i % total for i in self.vision_feature_layers)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "MultiModalConfig":
        """Parse and check config.json through its family (vlmcli.families.parse_config)."""
        from vlmcli.families import parse_config  # families imports this module

        return parse_config(cfg)[1]

    def validate(self) -> None:
        v, t = self.vision, self.text
        _positive("vision_config", image_size=v.image_size, patch_size=v.patch_size,
                  hidden_size=v.d_vision, num_hidden_layers=v.n_layers,
                  num_attention_heads=v.n_heads, intermediate_size=v.d_ff, num_channels=v.num_channels)
        _positive("text_config", vocab_size=t.vocab_size, hidden_size=t.d_model,
                  num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
                  num_key_value_heads=t.n_kv_heads, head_dim=t.head_dim, intermediate_size=t.d_ff,
                  max_position_embeddings=t.max_position_embeddings)
        if v.d_vision % v.n_heads:
            raise CheckpointError(
                f"config.json: vision hidden_size {v.d_vision} is not a multiple of "
                f"num_attention_heads {v.n_heads}"
            )
        if v.patch_size > v.image_size:
            raise CheckpointError(
                f"config.json: vision patch_size {v.patch_size} is larger than image_size {v.image_size}"
            )
        if t.n_heads % t.n_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {t.n_heads} is not a multiple of "
                f"num_key_value_heads {t.n_kv_heads}"
            )
        if t.head_dim % 2:
            raise CheckpointError(f"config.json: head_dim {t.head_dim} must be even for rotary embeddings")
        if t.rope.rope_type in ("dynamic", "yarn") and (t.head_dim < 4 or t.rope.theta == 1):
            # both formulas divide by (head_dim - 2) or log(theta)
            raise CheckpointError(
                f"config.json: {t.rope.rope_type} RoPE needs head_dim >= 4 and rope_theta != 1 "
                f"(got {t.head_dim}, {t.rope.theta})"
            )
        if t.sliding_window is not None:
            _positive("text_config", sliding_window=t.sliding_window)
        for name, value in (("attn_logit_softcapping", t.attn_logit_softcap),
                            ("final_logit_softcapping", t.final_logit_softcap)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise CheckpointError(f"config.json: {name} must be a positive number, not {value}")
        for name, value in (("rms_norm_eps", t.norm_eps), ("rope_theta", t.rope_theta),
                            ("layer_norm_eps", v.norm_eps)):
            if not math.isfinite(value) or value <= 0:
                raise CheckpointError(f"config.json: {name} must be a positive number, not {value}")
        if self.image_token_id < 0:
            raise CheckpointError(f"config.json: image_token_index {self.image_token_id} is negative")


# Far above any real model, low enough that shapes built from it never overflow.
_MAX_SIZE = 1 << 24


def _positive(where: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_SIZE:
            raise CheckpointError(
                f"config.json: {where}.{key} must be an integer from 1 to {_MAX_SIZE}, not {value!r}"
            )


# ---- sub-config parsers, one per model_type ----------------------------------------------


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise CheckpointError(f"config.json: '{where}' has no '{key}'")
    return cfg[key]


def _get(cfg: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    """cfg[key], or the architecture's default when the key is absent or null."""
    value = cfg.get(key)
    return defaults.get(key) if value is None else value


# transformers' CLIPVisionConfig / SiglipVisionConfig defaults (what a sparse config omits).
_VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
    ),
    "siglip_vision_model": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
    ),
}


def vision_from_hf(cfg: dict[str, Any]) -> VisionConfig:
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type not in _VISION_DEFAULTS:
        raise UnsupportedModelError(
            f"vision tower of model_type '{model_type}' is not supported "
            f"(supported: {', '.join(sorted(_VISION_DEFAULTS))})"
        )
    d = _VISION_DEFAULTS[model_type]
    siglip = model_type == "siglip_vision_model"
    vision = VisionConfig(
        model_type=model_type,
        image_size=int(_get(cfg, d, "image_size")),
        patch_size=int(_get(cfg, d, "patch_size")),
        d_vision=int(_get(cfg, d, "hidden_size")),
        n_layers=int(_get(cfg, d, "num_hidden_layers")),
        n_heads=int(_get(cfg, d, "num_attention_heads")),
        d_ff=int(_get(cfg, d, "intermediate_size")),
        norm_eps=float(_get(cfg, d, "layer_norm_eps")),
        activation=_get(cfg, d, "hidden_act"),
        num_channels=int(_get(cfg, d, "num_channels")),
        class_token=not siglip,
        pre_layernorm=not siglip,
        patch_bias=siglip,
    )
    return vision  # MultiModalConfig.validate checks the values


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


# transformers' LlamaConfig / MistralConfig / Qwen2Config / GemmaConfig defaults (5.x; the
# same values as the 4.x releases the llava-hf configs were written with).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
        max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
        sliding_window=4096, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=4096, max_window_layers=28,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ),
    "gemma": dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    ),
    "gemma2": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
}

SUPPORTED_TEXT_MODEL_TYPES = tuple(sorted(_TEXT_DEFAULTS))
SUPPORTED_ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "yarn")


def text_default(model_type: str, key: str) -> Any:
    """The architecture's default for `key` (e.g. whether Gemma ties its embeddings)."""
    return _TEXT_DEFAULTS.get(model_type, {}).get(key)


def _rope_from_hf(cfg: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    """RoPE settings as transformers standardises them (convert_rope_params_to_dict).

    transformers 5 writes `rope_parameters` (theta inside); older configs keep `rope_theta`
    and `rope_scaling` at the top level, and `rope_scaling` wins when both are present. An
    old-style `type` key is read as `rope_type`; llama3 and yarn default
    original_max_position_embeddings to max_position_embeddings.
    """
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported")
    if rope_type in ("llama3", "yarn"):
        if cfg.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    required = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    for key in required:
        if key not in params:
            raise CheckpointError(f"config.json: RoPE scaling '{rope_type}' needs '{key}'")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = params.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
        ):
            raise CheckpointError(f"config.json: RoPE scaling '{rope_type}' has {key} {value!r}; expected a positive number")
    if rope_type == "llama3" and params["low_freq_factor"] == params["high_freq_factor"]:
        raise CheckpointError("config.json: llama3 RoPE scaling needs low_freq_factor != high_freq_factor")
    if rope_type == "default":
        params = {}
    return RopeConfig(theta=float(theta), rope_type=rope_type, params=tuple(sorted(params.items())))


def text_from_hf(cfg: dict[str, Any]) -> TextConfig:
    model_type = cfg.get("model_type", "llama")
    if model_type not in _TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"decoder of model_type '{model_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_TEXT_MODEL_TYPES)})"
        )
    d = _TEXT_DEFAULTS[model_type]
    d_model = int(_get(cfg, d, "hidden_size"))
    n_heads = int(_get(cfg, d, "num_attention_heads"))
    n_kv = int(_get(cfg, d, "num_key_value_heads") or n_heads)
    head_dim = int(_get(cfg, d, "head_dim") or d_model // n_heads)
    n_layers = int(_get(cfg, d, "num_hidden_layers"))
    max_pos = int(_get(cfg, d, "max_position_embeddings"))
    # Gemma2Config reads `hidden_activation` (a `hidden_act` key there is ignored)
    activation = (cfg.get("hidden_activation") or d["hidden_act"]) if model_type == "gemma2" else _get(cfg, d, "hidden_act")
    qkv_bias = o_bias = bool(_get(cfg, d, "attention_bias") or False)
    sliding_window, sliding_layers, sliding_from = None, None, 0
    multiplier, norm_offset = 1.0, 0.0
    attention_scale = attn_softcap = final_softcap = None
    if model_type == "mistral":
        # Mistral ignores `layer_types`: the window (if any) applies to every layer.
        sliding_window = cfg.get("sliding_window", d["sliding_window"])
    elif model_type == "qwen2":
        qkv_bias, o_bias = True, False  # fixed by the architecture, not configurable
        if _get(cfg, d, "use_sliding_window"):
            sliding_window = cfg.get("sliding_window", d["sliding_window"])
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            sliding_layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        else:  # transformers: layer i slides when i >= max_window_layers
            sliding_from = max(0, min(int(_get(cfg, d, "max_window_layers")), n_layers))
    elif model_type == "gemma":
        if activation == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh approximation
            activation = "gelu_pytorch_tanh"
        multiplier = d_model**0.5
        norm_offset = 1.0
    elif model_type == "gemma2":
        multiplier = d_model**0.5
        norm_offset = 1.0
        scalar = float(_get(cfg, d, "query_pre_attn_scalar"))
        if not math.isfinite(scalar) or scalar <= 0:
            raise CheckpointError(f"config.json: query_pre_attn_scalar must be a positive number, not {scalar}")
        attention_scale = scalar**-0.5
        # null is a setting here (no capping), not "use the default"
        attn_softcap = cfg.get("attn_logit_softcapping", d["attn_logit_softcapping"])
        final_softcap = cfg.get("final_logit_softcapping", d["final_logit_softcapping"])
        sliding_window = cfg.get("sliding_window", d["sliding_window"])
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            sliding_layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        else:  # Gemma2Config: even layers slide, odd ones see everything
            sliding_layers = tuple(range(0, n_layers, 2))
    if sliding_layers == () or sliding_from >= n_layers:
        sliding_window = None  # no layer slides
    if sliding_window is None:
        sliding_layers, sliding_from = None, 0
    rope = _rope_from_hf(cfg, max_pos)

    return TextConfig(
        model_type=model_type,
        vocab_size=int(_get(cfg, d, "vocab_size")),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=int(_get(cfg, d, "intermediate_size")),
        norm_eps=float(_get(cfg, d, "rms_norm_eps")),
        rope=rope,
        rope_theta=rope.theta,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(_get(cfg, d, "tie_word_embeddings")),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(_get(cfg, d, "mlp_bias") or False),
        activation=activation,
        sliding_window=None if sliding_window is None else int(sliding_window),
        sliding_layers=sliding_layers,
        sliding_from=sliding_from,
        embedding_multiplier=multiplier,
        norm_offset=norm_offset,
        attention_scale=attention_scale,
        attn_logit_softcap=None if attn_softcap is None else float(attn_softcap),
        final_logit_softcap=None if final_softcap is None else float(final_softcap),
        sandwich_norms=model_type == "gemma2",
        bos_token_id=cfg.get("bos_token_id", d["bos_token_id"]),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id", d["eos_token_id"])),
        pad_token_id=cfg.get("pad_token_id", d["pad_token_id"]),
    )


def anyres_from_hf(
    cfg: dict[str, Any], vision: VisionConfig, default_pinpoints: list[list[int]], vision_aspect_ratio: str | None
) -> AnyresConfig:
    """The anyres settings of a llava_next / llava_onevision config."""
    pinpoints = cfg.get("image_grid_pinpoints") or default_pinpoints
    try:
        grid = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: image_grid_pinpoints must be [height, width] pairs, got {pinpoints!r}") from None
    tile = vision.image_size
    bad = [p for p in grid if p[0] % tile or p[1] % tile or min(p) <= 0]
    if not grid or bad:
        raise CheckpointError(
            f"config.json: image_grid_pinpoints {list(map(list, bad or grid))} are not whole multiples "
            f"of the vision tower's {tile} px input"
        )
    max_tiles = None
    if vision_aspect_ratio is not None:
        prefix = "anyres_max_"
        if not (vision_aspect_ratio.startswith(prefix) and vision_aspect_ratio[len(prefix):].isdigit()):
            raise UnsupportedModelError(
                f"vision_aspect_ratio '{vision_aspect_ratio}' is not supported (supported: anyres_max_N)"
            )
        max_tiles = int(vision_aspect_ratio[len(prefix):])
        if max_tiles < 1:
            raise CheckpointError(f"config.json: vision_aspect_ratio '{vision_aspect_ratio}' allows no tiles")
    return AnyresConfig(
        grid_pinpoints=grid,
        tile=tile,
        patches_per_side=vision.image_size // vision.patch_size,
        max_tiles=max_tiles,
        base_only_when_several=vision_aspect_ratio is not None,
    )


# How `vlm info` names the parts.
VISION_NAMES = {"clip_vision_model": "CLIP ViT", "siglip_vision_model": "SigLIP"}
DECODER_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "gemma2": "Gemma2"}


def describe_parts(family_name: str, cfg: MultiModalConfig) -> str:
    """What a checkpoint is made of, for people: 'LLaVA (SigLIP, MLP projector, Qwen2 decoder)'."""
    projector = "MLP" if cfg.projection.projection_type == "mlp" else cfg.projection.projection_type
    return (
        f"{family_name} ({VISION_NAMES.get(cfg.vision.model_type, cfg.vision.model_type)}, "
        f"{projector} projector, {DECODER_NAMES.get(cfg.text.model_type, cfg.text.model_type)} decoder)"
    )
