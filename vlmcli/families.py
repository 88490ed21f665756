"""Model families: one table from a checkpoint's `model_type` to everything that differs.

A family says how to parse its config.json, how its checkpoint names its tensors, and
what to use when a checkpoint leaves out a chat template or preprocessing settings.
Anything not in the table is refused with the list of what is, and nothing a checkpoint
ships as code (`auto_map`) is ever run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from vlmcli.config import (
    MultiModalConfig,
    ProjectionConfig,
    text_from_hf,
    vision_from_hf,
)
from vlmcli.errors import CheckpointError, UnsupportedModelError

# CLIP's own normalisation statistics (llava-1.5 uses CLIP ViT-L/14-336 unchanged).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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

# The vision tower llava's config implies when config.json has no vision_config:
# CLIP ViT-L/14 at 336 px, as transformers' LlavaConfig assumes.
_LLAVA_DEFAULT_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "patch_size": 14,
    "image_size": 336,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}


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


def _parse_llava(cfg: dict[str, Any]) -> MultiModalConfig:
    vision = vision_from_hf({**_LLAVA_DEFAULT_VISION, **(cfg.get("vision_config") or {})})
    text_cfg = dict(cfg.get("text_config") or {"model_type": "llama"})
    # transformers forwards tie_word_embeddings between the top level and text_config.
    text_cfg["tie_word_embeddings"] = bool(
        cfg.get("tie_word_embeddings") or text_cfg.get("tie_word_embeddings")
    )
    text = text_from_hf(text_cfg)

    layers = cfg.get("vision_feature_layer", -2)
    layers = (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers)
    total = vision.n_layers + 1
    if not layers:
        raise CheckpointError("config.json: vision_feature_layer is an empty list")
    for i in layers:
        if not -total <= i < total:
            raise CheckpointError(
                f"config.json: vision_feature_layer {i} is outside the vision tower's "
                f"{vision.n_layers} layers"
            )
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UnsupportedModelError(
            f"vision_feature_select_strategy '{strategy}' is not supported (supported: default, full)"
        )
    image_token_id = cfg.get("image_token_index", cfg.get("image_token_id", 32000))
    projection = ProjectionConfig(
        d_vision=vision.d_vision * len(layers),
        d_language=text.d_model,
        projection_type=cfg.get("projector_type", "mlp"),
        activation=cfg.get("projector_hidden_act", "gelu"),
        bias=bool(cfg.get("multimodal_projector_bias", True)),
    )
    if projection.projection_type not in ("linear", "mlp"):
        raise UnsupportedModelError(
            f"projection type '{projection.projection_type}' is not supported (supported: linear, mlp)"
        )
    return MultiModalConfig(
        model_type=cfg["model_type"],
        vision=vision,
        projection=projection,
        text=text,
        image_token_id=int(image_token_id),
        vision_feature_layers=layers,
        vision_feature_select_strategy=strategy,
        raw=cfg,
    )


# Checkpoints name the same tensors several ways: llava-hf's hub repos use
# `language_model.model.*` / `language_model.lm_head` / `vision_tower.vision_model.*`, and
# transformers 5 (in memory, and in some saved files) uses `model.language_model.*`,
# `lm_head`, `model.vision_tower.*` without `vision_model`. All map onto our module tree.
_LLAVA_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "decoder."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="LLaVA-1.5",
        model_types=("llava",),
        parse_config=_parse_llava,
        weight_renames=_LLAVA_RENAMES,
        default_chat_template=LLAVA_DEFAULT_CHAT_TEMPLATE,
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
