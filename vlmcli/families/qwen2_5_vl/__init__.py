"""Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct): Qwen2-VL with a windowed tower.

Everything but the vision tower's blocks is Qwen2-VL's and comes from qwen2_vl/: the image
processor (smart_resize, 14 px patches of 2 frames), the prompt and its 3-D RoPE positions,
the 2x2 patch merger (with RMSNorm), the Qwen2 decoder with M-RoPE, the weight names and
the chat template. The tower's blocks are qwen2_vl/vision.py's with RMSNorm, a SwiGLU MLP,
and attention within 112 px windows except in the fullatt_block_indexes blocks.
"""

from __future__ import annotations

from vlmcli.families import Family
from vlmcli.families.qwen2_5_vl.config import Qwen2_5VLConfig, parse_qwen2_5_vl
from vlmcli.families.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE
from vlmcli.families.qwen2_vl.model import Qwen2VLModel
from vlmcli.families.qwen2_vl.processor import Qwen2VLProcessor
from vlmcli.families.qwen2_vl.weights import HF_SKIP_MODULES, keep_dense, weight_name

FAMILY_NAME = "Qwen2.5-VL"


def build(cfg: Qwen2_5VLConfig, full: bool = False) -> Qwen2VLModel:
    return Qwen2VLModel(cfg, full)


def describe(cfg: Qwen2_5VLConfig) -> str:
    window = cfg.vision.window_size
    return (f"{FAMILY_NAME} (native-resolution ViT with 2-D RoPE and {window} px windows, 2x2 patch merger, "
            f"Qwen2 decoder with M-RoPE)")


FAMILIES = (
    Family(
        name=FAMILY_NAME,
        model_types=("qwen2_5_vl",),
        parse=parse_qwen2_5_vl,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: Qwen2VLProcessor(cfg, folder, tokenizer, notice, FAMILY_NAME),
        # the hub repos' template is Qwen2-VL's
        chat_template=lambda cfg: QWEN2_VL_CHAT_TEMPLATE,
        describe=describe,
    ),
)
