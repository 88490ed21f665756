"""Qwen-VL (Qwen/Qwen-VL, Qwen/Qwen-VL-Chat: the remote-code `qwen` layout).

A 448 px ViT-bigG, a cross-attention resampler (256 learned queries with 2-D sin-cos
positions) as the projection, and the QWen-7B decoder; a tiktoken vocabulary (qwen.tiktoken),
ChatML prompts with each image as "Picture k: <img>...</img>\\n". Nothing the checkpoints
ship as code is run.
"""

from __future__ import annotations

from vlmcli.families import Family
from vlmcli.families.qwen_vl.config import QwenVLConfig, parse_qwen_vl
from vlmcli.families.qwen_vl.model import QwenVLModel
from vlmcli.families.qwen_vl.processor import DEFAULT_SYSTEM, FAMILY_NAME, QwenVLProcessor
from vlmcli.families.qwen_vl.tokenizer import vocabulary
from vlmcli.families.qwen_vl.weights import HF_SKIP_MODULES, keep_dense, weight_name

# The Tokenizer interface wants a template; the processor builds ids itself (make_context
# encodes role, newline and content apart), and this renders the same text.
QWEN_VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% set n = namespace(k=0) %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set n.k = n.k + 1 %}Picture {{ n.k }}: <img></img>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>{% if not loop.last %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
)


def build(cfg: QwenVLConfig, full: bool = False) -> QwenVLModel:
    return QwenVLModel(cfg, full)


def describe(cfg: QwenVLConfig) -> str:
    return f"{FAMILY_NAME} (ViT-bigG, cross-attention resampler projector, QWen decoder)"


FAMILIES = (
    Family(
        name=FAMILY_NAME,
        model_types=("qwen",),
        parse=parse_qwen_vl,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: QwenVLProcessor(cfg, folder, tokenizer, notice),
        chat_template=lambda cfg: QWEN_VL_CHAT_TEMPLATE,
        describe=describe,
        template_is_the_models=True,  # make_context in the published code, not a file
        vocabulary=vocabulary,
    ),
)
