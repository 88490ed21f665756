"""Model families: one table from a checkpoint's `model_type` to everything that differs.

A family says how to parse its config.json, how its checkpoint names its tensors, and
what to use when a checkpoint leaves out a chat template or preprocessing settings.
Anything not in the table is refused with the list of what is, and nothing a checkpoint
ships as code (`auto_map`) is ever run.

    model_type        family            vision        decoders                     images
    llava             LLaVA             CLIP, SigLIP  Llama, Mistral, Qwen2, Gemma one view each
    llava_next        LLaVA-NeXT        CLIP, SigLIP  (same)                       anyres tiles
    llava_onevision   LLaVA-OneVision   SigLIP, CLIP  (same)                       anyres_max_N tiles

`describe(config)` names what a checkpoint is made of, e.g.
"LLaVA-NeXT (CLIP ViT, MLP projector, Mistral decoder)".
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

from vlmcli.config import (
    MultiModalConfig,
    ProjectionConfig,
    anyres_from_hf,
    text_default,
    text_from_hf,
    vision_from_hf,
)
from vlmcli.errors import CheckpointError, UnsupportedModelError

# CLIP's own normalisation statistics (llava-1.5 uses CLIP ViT-L/14-336 unchanged).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's: every channel mapped from [0, 1] to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# llava-1.5's conversation format ("vicuna_v1" in the original repo), as a chat template in
# the llava-hf shape: images first in a user turn, then its text.
LLAVA_DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ ' ' }}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The ChatML format of Qwen-based LLaVAs (llava-interleave, LLaVA-OneVision), in the shape of
# their llava-hf templates (each turn's images first as "<image>\n"), also taking plain
# string content.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral-Instruct's [INST] format, as llava-v1.6-mistral uses it ("[INST] <image>\n... [/INST]").
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

_TEMPLATE_BY_DECODER = {"qwen2": CHATML_CHAT_TEMPLATE, "mistral": MISTRAL_CHAT_TEMPLATE}

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

_VISION_NAMES = {"clip_vision_model": "CLIP ViT", "siglip_vision_model": "SigLIP"}
_DECODER_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma"}
_PROJECTOR_TYPES = {"linear": "linear", "mlp": "mlp", "mlp2x_gelu": "mlp"}


@dataclass(frozen=True)
class Family:
    name: str  # shown by `vlm info`
    model_types: tuple[str, ...]
    parse_config: Callable[[dict[str, Any]], MultiModalConfig]
    # (pattern, replacement) applied in order, first match wins: checkpoint name -> ours.
    weight_renames: tuple[tuple[str, str], ...]
    default_chat_template: str
    default_mean: tuple[float, float, float]
    default_std: tuple[float, float, float]

    def canonical_name(self, key: str) -> str | None:
        """Our parameter name for a checkpoint tensor name, or None for tensors we don't use."""
        for pattern, repl in self.weight_renames:
            new, n = re.subn(pattern, repl, key, count=1)
            if n:
                return new
        return None

    def describe(self, cfg: MultiModalConfig) -> str:
        """What the checkpoint is made of, for people: 'LLaVA (SigLIP, MLP projector, Qwen2 decoder)'."""
        projector = "MLP" if cfg.projection.projection_type == "mlp" else cfg.projection.projection_type
        return (
            f"{self.name} ({_VISION_NAMES.get(cfg.vision.model_type, cfg.vision.model_type)}, "
            f"{projector} projector, {_DECODER_NAMES.get(cfg.text.model_type, cfg.text.model_type)} decoder)"
        )

    def chat_template_for(self, cfg: MultiModalConfig) -> str:
        """The conversation format to assume when a checkpoint ships no chat template: the
        decoder's own (ChatML for Qwen2, [INST] for Mistral), else llava-1.5's."""
        return _TEMPLATE_BY_DECODER.get(cfg.text.model_type, self.default_chat_template)

    def image_processor_defaults(self, cfg: MultiModalConfig) -> dict[str, Any]:
        """A preprocessor_config.json for a checkpoint that has none: what the vision tower
        was trained with (CLIP: shortest edge + center crop; SigLIP: a plain resize)."""
        size = cfg.vision.image_size
        if cfg.vision.model_type == "siglip_vision_model":
            recipe: dict[str, Any] = {
                "size": {"height": size, "width": size},
                "do_center_crop": False,
                "image_mean": list(SIGLIP_MEAN),
                "image_std": list(SIGLIP_STD),
            }
        else:
            recipe = {
                "size": {"shortest_edge": size},
                "crop_size": {"height": size, "width": size},
                "do_center_crop": True,
                "image_mean": list(self.default_mean),
                "image_std": list(self.default_std),
            }
        if cfg.anyres is not None:
            recipe["image_grid_pinpoints"] = [list(p) for p in cfg.anyres.grid_pinpoints]
        return recipe


def _feature_layers(cfg: dict[str, Any], default: int, n_layers: int) -> tuple[int, ...]:
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

    layers = _feature_layers(cfg, default_layer, vision.n_layers)
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


def _parse_llava(cfg: dict[str, Any]) -> MultiModalConfig:
    return _parse(
        cfg,
        default_vision=_CLIP_L_336,
        default_text_type="llama",
        default_strategy="default",
        default_layer=-2,
        default_image_token=32000,
        tie_from_text=True,
    )


def _parse_llava_next(cfg: dict[str, Any]) -> MultiModalConfig:
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


def _parse_llava_onevision(cfg: dict[str, Any]) -> MultiModalConfig:
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


# Checkpoints name the same tensors several ways: llava-hf's hub repos use
# `language_model.model.*` / `language_model.lm_head` / `vision_tower.vision_model.*` (and
# `image_newline` at the top level for NeXT and OneVision), while transformers 5 (in memory,
# and in some saved files) uses `model.language_model.*`, `lm_head`, `model.vision_tower.*`
# without `vision_model`, `model.image_newline`. All map onto our module tree; the vision
# towers' post_layernorm and SigLIP's pooling `head` map to names we do not have, so they
# are reported as unused.
_LLAVA_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "decoder."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^(?:model\.)?image_newline$", "image_newline"),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="LLaVA",
        model_types=("llava",),
        parse_config=_parse_llava,
        weight_renames=_LLAVA_RENAMES,
        default_chat_template=LLAVA_DEFAULT_CHAT_TEMPLATE,
        default_mean=CLIP_MEAN,
        default_std=CLIP_STD,
    ),
    Family(
        name="LLaVA-NeXT",
        model_types=("llava_next",),
        parse_config=_parse_llava_next,
        weight_renames=_LLAVA_RENAMES,
        default_chat_template=LLAVA_DEFAULT_CHAT_TEMPLATE,
        default_mean=CLIP_MEAN,
        default_std=CLIP_STD,
    ),
    Family(
        name="LLaVA-OneVision",
        model_types=("llava_onevision",),
        parse_config=_parse_llava_onevision,
        weight_renames=_LLAVA_RENAMES,
        default_chat_template=CHATML_CHAT_TEMPLATE,
        default_mean=CLIP_MEAN,
        default_std=CLIP_STD,
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(cfg: dict[str, Any]) -> Family:
    model_type = cfg.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    found = f"'{model_type}'" if model_type else "no model_type"
    raise UnsupportedModelError(
        f"config.json has {found}; supported model types: {', '.join(supported_model_types())}"
    )


def describe(cfg: dict[str, Any] | MultiModalConfig) -> str:
    """Family and parts of a checkpoint, from its config.json dict or a parsed config."""
    if isinstance(cfg, MultiModalConfig):
        return family_for({"model_type": cfg.model_type}).describe(cfg)
    family = family_for(cfg)
    return family.describe(family.parse_config(cfg))
