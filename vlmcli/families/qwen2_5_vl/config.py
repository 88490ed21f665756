"""Qwen2.5-VL's config.json, read against transformers' Qwen2_5_VLConfig defaults.

The decoder and its M-RoPE are Qwen2-VL's (same keys, both layouts: the hub repos' flat
4.x one and transformers 5's nested `text_config`). The vision tower's keys differ:

    hidden_size             the tower's width (Qwen2-VL's embed_dim)
    intermediate_size       the SwiGLU MLP's width (Qwen2-VL: embed_dim * mlp_ratio)
    out_hidden_size         the merger's output, the decoder's width (Qwen2-VL's hidden_size)
    window_size             px per window side (112: 4x4 blocks of 2x2 patches)
    fullatt_block_indexes   blocks attending over whole images (7, 15, 23, 31)

RMSNorm everywhere in the tower and the merger (eps 1e-6), SiLU in the gated MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmcli.errors import CheckpointError, UnsupportedModelError
from vlmcli.families.qwen2_vl.config import Qwen2VisionConfig, Qwen2VLConfig, parse_qwen2_vl, vision_int

# transformers' Qwen2_5_VLVisionConfig defaults
_VISION_DEFAULTS: dict[str, Any] = dict(
    depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16, in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
    fullatt_block_indexes=(7, 15, 23, 31),
)


def vision_from_hf(cfg: dict[str, Any]) -> Qwen2VisionConfig:
    model_type = cfg.get("model_type", "qwen2_5_vl")
    if model_type not in ("qwen2_5_vl", "qwen2_5_vl_vision"):
        raise UnsupportedModelError(f"vision tower of model_type '{model_type}' is not supported in Qwen2.5-VL")
    patch = vision_int(cfg, _VISION_DEFAULTS, "patch_size", "spatial_patch_size")
    merge = vision_int(cfg, _VISION_DEFAULTS, "spatial_merge_size")
    full = cfg.get("fullatt_block_indexes", _VISION_DEFAULTS["fullatt_block_indexes"])
    if not isinstance(full, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in full):
        raise CheckpointError(f"config.json: vision_config.fullatt_block_indexes must be a list of integers, not {full!r}")
    rope = cfg.get("rope_parameters") or {}
    return Qwen2VisionConfig(
        model_type="qwen2_5_vl_vision",
        image_size=patch * merge,
        patch_size=patch,
        d_vision=vision_int(cfg, _VISION_DEFAULTS, "hidden_size"),
        n_layers=vision_int(cfg, _VISION_DEFAULTS, "depth"),
        n_heads=vision_int(cfg, _VISION_DEFAULTS, "num_heads"),
        d_ff=vision_int(cfg, _VISION_DEFAULTS, "intermediate_size"),
        activation=str(cfg.get("hidden_act") or _VISION_DEFAULTS["hidden_act"]),
        num_channels=vision_int(cfg, _VISION_DEFAULTS, "in_channels", "in_chans"),
        temporal_patch_size=vision_int(cfg, _VISION_DEFAULTS, "temporal_patch_size"),
        spatial_merge_size=merge,
        d_out=vision_int(cfg, _VISION_DEFAULTS, "out_hidden_size"),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm="rms",
        gated_mlp=True,
        window_size=vision_int(cfg, _VISION_DEFAULTS, "window_size"),
        fullatt_block_indexes=tuple(full),
    )


class Qwen2_5VLConfig(Qwen2VLConfig):
    def validate(self) -> None:
        super().validate()
        v = self.vision
        step = v.patch_size * v.spatial_merge_size
        if v.window_size < step:
            raise CheckpointError(f"config.json: vision_config.window_size {v.window_size} is less than one {step} px block")


def parse_qwen2_5_vl(cfg: dict[str, Any]) -> Qwen2_5VLConfig:
    """Qwen2-VL's parse for the decoder and the tokens, with this tower."""
    vision_cfg = dict(cfg.get("vision_config") or {})
    vision = vision_from_hf(vision_cfg)
    # Qwen2-VL's reader with a tower it accepts; its decoder, ids and projector are kept
    base = parse_qwen2_vl({**cfg, "vision_config": {"model_type": "qwen2_vl"}})
    merge = vision.spatial_merge_size
    projection = dataclasses.replace(base.projection, d_vision=vision.d_vision * merge * merge, d_language=vision.d_out)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return Qwen2_5VLConfig(**{**fields, "vision": vision, "projection": projection, "raw": cfg})
