"""The vision file llama.cpp pairs with a language model (`--mmproj`): `clip.*` metadata ->
the LLaVA config's vision part, and its tensor names -> llava-hf's.

What llama.cpp writes (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py, the
converter behind the LLaVA-1.5 / BakLLaVA / LLaVA-NeXT files people have) and how
clip.cpp reads it (tools/mtmd/clip.cpp, models/llava.cpp):

    clip.projector_type            mlp (mm.0 -> GELU -> mm.2; mm.0 alone: linear); others refused
    clip.vision.block_count        the blocks stored: the tower is cut after the deepest one used
    clip.vision.feature_layer      hidden-state indices (0: the embeddings), non-negative; absent:
                                   the input of the last stored block (clip.cpp's default)
    clip.vision.image_mean / std   the normalisation
    clip.use_gelu                  the tower's activation: GELU, else CLIP's QuickGELU
    clip.vision.image_grid_pinpoints (flattened) + mm_patch_merge_type spatial_unpad: LLaVA-NeXT

    v.class_embd, v.patch_embd.weight, v.position_embd.weight, v.pre_ln, v.post_ln,
    v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,ln2,ffn_up,ffn_down}, mm.0, mm.2,
    model.image_newline (NeXT)

The legacy converter names CLIP's fc1 `ffn_down` and fc2 `ffn_up` (newer ones the other way);
as clip.cpp does, the pair is told apart by shape: fc1 takes the tower's width.
Features drop the class token (clip.cpp gathers patches 1..N when the tower has one).
"""

from __future__ import annotations

import re
from typing import Any

from vlmcli.errors import CheckpointError, UnsupportedModelError
from vlmcli.gguf.reader import GGUFFile, short_float

_PREFIX = "vision_tower.vision_model."
_TOP = {
    "v.class_embd": _PREFIX + "embeddings.class_embedding",
    "v.patch_embd.weight": _PREFIX + "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": _PREFIX + "embeddings.patch_embedding.bias",
    "v.position_embd.weight": _PREFIX + "embeddings.position_embedding.weight",
    "v.pre_ln.weight": _PREFIX + "pre_layrnorm.weight",
    "v.pre_ln.bias": _PREFIX + "pre_layrnorm.bias",
    "v.post_ln.weight": _PREFIX + "post_layernorm.weight",
    "v.post_ln.bias": _PREFIX + "post_layernorm.bias",
    "mm.0.weight": "multi_modal_projector.linear_1.weight",
    "mm.0.bias": "multi_modal_projector.linear_1.bias",
    "mm.2.weight": "multi_modal_projector.linear_2.weight",
    "mm.2.bias": "multi_modal_projector.linear_2.bias",
    "model.image_newline": "image_newline",
    "v.image_newline": "image_newline",
}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2"}
_BLK = re.compile(r"^v\.blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def check_mmproj(file: GGUFFile) -> None:
    if file.architecture != "clip":
        raise UnsupportedModelError(
            f"{file.path.name} is not a vision projector (its general.architecture is "
            f"'{file.architecture}', not 'clip'): give the mmproj file llama.cpp pairs with the model"
        )
    if file.get("clip.has_vision_encoder") is False:
        raise UnsupportedModelError(f"{file.path.name} has no vision encoder")
    # clip.vision.projector_type: files of models with audio too name the vision one there
    kind = file.get("clip.vision.projector_type", file.get("clip.projector_type", "mlp"))
    if kind != "mlp":
        raise UnsupportedModelError(
            f"{file.path.name} has a '{kind}' projector; vlm runs LLaVA's mlp projector from GGUF (others later)"
        )
    if "mm.0.weight" not in file.tensors:
        raise CheckpointError(f"{file.path.name} has no projector (mm.0.weight)", hint="it is not a LLaVA mmproj file")


def vision_config(file: GGUFFile, text: dict[str, Any]) -> dict[str, Any]:
    """The top-level LLaVA config.json (without text_config) for this mmproj."""
    check_mmproj(file)

    def need(key: str) -> Any:
        return file.require(f"clip.vision.{key}")

    n_layers = int(need("block_count"))
    width = int(need("embedding_length"))
    # SigLIP (llava-interleave, OneVision): no class token, a bias on the patch embedding, GELU-tanh
    siglip = "v.class_embd" not in file.tensors and "v.patch_embd.bias" in file.tensors
    vision = {
        "model_type": "siglip_vision_model" if siglip else "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(need("attention.head_count")),
        "image_size": int(need("image_size")),
        "patch_size": int(need("patch_size")),
        "layer_norm_eps": short_float(file.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
        "hidden_act": "gelu_pytorch_tanh" if siglip else ("gelu" if file.get("clip.use_gelu") else "quick_gelu"),
    }
    layers = file.get("clip.vision.feature_layer")
    layers = [int(i) for i in layers] if layers else [n_layers - 1]
    projector = file.tensors["mm.0.weight"]
    last = file.tensors.get("mm.2.weight", projector)
    if last.shape[0] != text["hidden_size"]:
        raise CheckpointError(
            f"{file.path.name} projects images to width {last.shape[0]} but the language model's "
            f"width is {text['hidden_size']}: this mmproj belongs to another model"
        )
    if projector.shape[1] != width * len(layers):
        raise CheckpointError(
            f"{file.path.name}: its projector takes width {projector.shape[1]}, its tower gives "
            f"{width} x {len(layers)} feature layers", hint="the file is inconsistent"
        )
    cfg: dict[str, Any] = {
        "model_type": "llava",
        "vision_config": vision,
        "vision_feature_layer": layers if len(layers) > 1 else layers[0],
        # clip.cpp gathers the patch rows only, after the class token when the tower has one
        "vision_feature_select_strategy": "default" if "v.class_embd" in file.tensors else "full",
        "projector_type": "mlp" if "mm.2.weight" in file.tensors else "linear",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": "mm.0.bias" in file.tensors,
    }
    pinpoints = file.get("clip.vision.image_grid_pinpoints")
    if pinpoints and file.get("clip.vision.mm_patch_merge_type", "flat") == "spatial_unpad":
        cfg["model_type"] = "llava_next"
        cfg["image_grid_pinpoints"] = [[int(pinpoints[i]), int(pinpoints[i + 1])] for i in range(0, len(pinpoints) - 1, 2)]
    return cfg


def image_processor(file: GGUFFile, cfg: dict[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json with the file's statistics: CLIP's recipe (shortest edge,
    center crop), SigLIP's (a square resize), or LLaVA-NeXT's anyres one."""
    size = cfg["vision_config"]["image_size"]
    out = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [short_float(v) for v in file.require("clip.vision.image_mean")],
        "image_std": [short_float(v) for v in file.require("clip.vision.image_std")],
        "do_convert_rgb": True, "resample": 3,
    }
    if cfg["vision_config"]["model_type"] == "siglip_vision_model":  # SiglipImageProcessor: a plain resize
        out.update(image_processor_type="SiglipImageProcessor", size={"height": size, "width": size}, do_center_crop=False)
        del out["crop_size"]
    if "image_grid_pinpoints" in cfg:  # LLaVA-NeXT: LlavaNextImageProcessor's anyres recipe
        out.update(image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=cfg["image_grid_pinpoints"],
                   do_pad=True, aspect_ratio_setting="anyres")
    return out


def hf_name(file: GGUFFile, name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _BLK.match(name)
    if not m:
        return None
    block, part, kind = m.groups()
    if part in _BLOCK:
        return f"{_PREFIX}encoder.layers.{block}.{_BLOCK[part]}.{kind}"
    if part in ("ffn_up", "ffn_down"):
        width = file.get("clip.vision.embedding_length")
        weight = file.tensors.get(f"v.blk.{block}.{part}.weight")
        if weight is not None and weight.shape[0] == weight.shape[1]:  # square: trust the name (current converters)
            fc = "fc1" if part == "ffn_up" else "fc2"
        else:
            fc = "fc1" if weight is not None and weight.shape[-1] == width else "fc2"
        return f"{_PREFIX}encoder.layers.{block}.mlp.{fc}.{kind}"
    return None
