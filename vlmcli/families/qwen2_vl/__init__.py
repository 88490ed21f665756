"""Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct): native-resolution images.

A ViT over 14 px patches of the image at its own aspect ratio (a multiple of 28 px within
min_pixels..max_pixels), 2-D RoPE, attention within each image, a 2x2 patch merger, and a
Qwen2 decoder with multimodal RoPE in ChatML.
"""

from __future__ import annotations

from vlmcli.families import Family
from vlmcli.families.qwen2_vl.config import Qwen2VLConfig, parse_qwen2_vl
from vlmcli.families.qwen2_vl.model import Qwen2VLModel
from vlmcli.families.qwen2_vl.processor import FAMILY_NAME, Qwen2VLProcessor
from vlmcli.families.qwen2_vl.weights import HF_SKIP_MODULES, keep_dense, weight_name

# The hub repos' chat template (images and videos between vision markers, a default system turn)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(cfg: Qwen2VLConfig, full: bool = False) -> Qwen2VLModel:
    return Qwen2VLModel(cfg, full)


def describe(cfg: Qwen2VLConfig) -> str:
    return f"{FAMILY_NAME} (native-resolution ViT with 2-D RoPE, 2x2 patch merger, Qwen2 decoder with M-RoPE)"


FAMILIES = (
    Family(
        name=FAMILY_NAME,
        model_types=("qwen2_vl",),
        parse=parse_qwen2_vl,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: Qwen2VLProcessor(cfg, folder, tokenizer, notice),
        chat_template=lambda cfg: QWEN2_VL_CHAT_TEMPLATE,
        describe=describe,
    ),
)
