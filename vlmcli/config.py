"""Model configuration: the seed's fields, read from a Hugging Face `config.json`.

Three parts, one per stage of the pipeline (vision encoder, projection, language decoder),
and MultiModalConfig to hold them together. Each part is parsed from its own sub-config and
dispatched on its own `model_type`, so a LLaVA with another vision tower or decoder only adds
a parser here and an entry in `families.py`.

Defaults are the ones `transformers` applies when a key is absent: real checkpoints
(llava-hf/llava-1.5-7b-hf among them) write only the keys that differ from those defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
    activation: str = "quick_gelu"  # CLIP was trained with x * sigmoid(1.702 x)
    num_channels: int = 3
    class_token: bool = True  # CLIP prepends a learned [CLS]; SigLIP has none

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
    projection_type: str = "mlp"  # linear (LLaVA v1) | mlp (LLaVA-1.5) | cross_attention
    activation: str = "gelu"
    bias: bool = True

    @property
    def hidden(self) -> int:
        return self.d_hidden if self.d_hidden is not None else self.d_language


@dataclass(frozen=True)
class TextConfig:
    """A LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, gated MLP)."""

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
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "default"} = plain RoPE
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None


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
    vision_feature_select_strategy: str = "default"  # default drops [CLS]; full keeps it
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def max_visual_tokens(self) -> int:
        """Visual tokens one image becomes (one per patch, plus [CLS] under `full`)."""
        n = self.vision.num_patches()
        if self.vision.class_token and self.vision_feature_select_strategy == "full":
            n += 1
        return n

    def vision_layers_needed(self) -> int:
        """How many encoder blocks must run: the deepest selected hidden state."""
        total = self.vision.n_layers + 1  # hidden_states has embeddings + one per block
        return max(i % total for i in self.vision_feature_layers)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "MultiModalConfig":
        """Parse config.json through its family's parser, then check the values make a model.

        A value of the wrong type anywhere (a string where a size belongs, a list for a
        dict) surfaces as a CheckpointError naming config.json, not as a Python error."""
        from vlmcli.families import family_for  # families imports this module

        try:
            parsed = family_for(cfg).parse_config(cfg)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
            raise CheckpointError(f"config.json has an invalid value ({type(e).__name__}: {e})") from None
        parsed.validate()
        return parsed

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


def vision_from_hf(cfg: dict[str, Any]) -> VisionConfig:
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise UnsupportedModelError(
            f"vision tower of model_type '{model_type}' is not supported "
            f"(supported: clip_vision_model)"
        )
    defaults = VisionConfig()
    return VisionConfig(
        model_type=model_type,
        image_size=int(cfg.get("image_size", defaults.image_size)),
        patch_size=int(cfg.get("patch_size", defaults.patch_size)),
        d_vision=int(cfg.get("hidden_size", defaults.d_vision)),
        n_layers=int(cfg.get("num_hidden_layers", defaults.n_layers)),
        n_heads=int(cfg.get("num_attention_heads", defaults.n_heads)),
        d_ff=int(cfg.get("intermediate_size", defaults.d_ff)),
        norm_eps=float(cfg.get("layer_norm_eps", defaults.norm_eps)),
        activation=cfg.get("hidden_act", defaults.activation),
        num_channels=int(cfg.get("num_channels", defaults.num_channels)),
        class_token=True,
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def text_from_hf(cfg: dict[str, Any]) -> TextConfig:
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise UnsupportedModelError(
            f"decoder of model_type '{model_type}' is not supported (supported: llama)"
        )
    d = TextConfig()
    d_model = int(cfg.get("hidden_size", d.d_model))
    n_heads = int(cfg.get("num_attention_heads", d.n_heads))
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or d_model // n_heads
    # transformers 5 nests RoPE settings in rope_parameters; older configs keep rope_theta and
    # rope_scaling at the top level.
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", d.rope_theta)))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise UnsupportedModelError(
            f"RoPE scaling '{scaling.get('rope_type', scaling.get('type'))}' is not supported yet "
            f"(supported: default)"
        )
    return TextConfig(
        model_type=model_type,
        vocab_size=int(cfg.get("vocab_size", d.vocab_size)),
        d_model=d_model,
        n_layers=int(cfg.get("num_hidden_layers", d.n_layers)),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        d_ff=int(cfg.get("intermediate_size", d.d_ff)),
        norm_eps=float(cfg.get("rms_norm_eps", d.norm_eps)),
        rope_theta=rope_theta,
        rope_scaling=None,
        max_position_embeddings=int(cfg.get("max_position_embeddings", d.max_position_embeddings)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        activation=cfg.get("hidden_act", d.activation),
        bos_token_id=cfg.get("bos_token_id", d.bos_token_id),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id", 2)),
        pad_token_id=cfg.get("pad_token_id"),
    )
