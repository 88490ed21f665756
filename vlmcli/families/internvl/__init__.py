"""InternVL (transformers' `internvl` layout: OpenGVLab/InternVL3-1B-hf, -2B-hf, -8B-hf).

InternViT on 448 px tiles (dynamic tiling plus a thumbnail), a 0.5 pixel shuffle (256
tokens a tile), a LayerNorm + MLP projector, and a Qwen2 decoder in ChatML.
"""

from __future__ import annotations

from vlmcli.config import DECODER_NAMES
from vlmcli.families import Family
from vlmcli.families.internvl.config import InternVLConfig, parse_internvl
from vlmcli.families.internvl.model import InternVLModel
from vlmcli.families.internvl.processor import FAMILY_NAME, InternVLProcessor
from vlmcli.families.internvl.weights import HF_SKIP_MODULES, keep_dense, weight_name

# The -hf repos' chat template (transformers' convert_internvl_weights_to_hf.py): ChatML,
# each image as "<IMG_CONTEXT>\n" where it stands in the turn, no default system prompt.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def build(cfg: InternVLConfig, full: bool = False) -> InternVLModel:
    """full: every block of the vision tower (convert writes them all)."""
    return InternVLModel(cfg, full)


def describe(cfg: InternVLConfig) -> str:
    decoder = DECODER_NAMES.get(cfg.text.model_type, cfg.text.model_type)
    return f"{FAMILY_NAME} (InternViT, MLP projector, {decoder} decoder)"


FAMILIES = (
    Family(
        name=FAMILY_NAME,
        model_types=("internvl",),
        parse=parse_internvl,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: InternVLProcessor(cfg, folder, tokenizer, notice),
        chat_template=lambda cfg: INTERNVL_CHAT_TEMPLATE,
        describe=describe,
    ),
)
