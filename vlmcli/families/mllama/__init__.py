"""Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision(-Instruct), -90B-Vision(-Instruct)):
images enter through cross-attention layers inside a Llama 3.1 decoder, never as tokens.

A tiled ViT (up to max_num_tiles square tiles per image, by the supported aspect ratios,
gated position and tile embeddings, local then global blocks, intermediate layers
concatenated) -> one Linear into the decoder's width -> the decoder's cross-attention
layers (tanh-gated, q/k norms). The prompt carries one <|image|> per image, in the
checkpoint's chat template.
"""

from __future__ import annotations

from vlmcli.families import Family
from vlmcli.families.mllama.config import MllamaConfig, parse_mllama
from vlmcli.families.mllama.model import MllamaModel
from vlmcli.families.mllama.processor import FAMILY_NAME, MllamaProcessor
from vlmcli.families.mllama.weights import HF_SKIP_MODULES, keep_dense, weight_name

# What the hub repos' template comes to for user / assistant turns with images and text
# (theirs adds tool calls and a dated system turn); used only when a checkpoint has none.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def build(cfg: MllamaConfig, full: bool = False) -> MllamaModel:
    return MllamaModel(cfg, full)


def describe(cfg: MllamaConfig) -> str:
    return (
        f"{FAMILY_NAME} (tiled ViT, {cfg.vision.max_num_tiles} x {cfg.vision.image_size} px tiles; linear projection "
        f"into {len(cfg.cross_attention_layers)} decoder cross-attention layers; Llama 3.1 decoder)"
    )


FAMILIES = (
    Family(
        name=FAMILY_NAME,
        model_types=("mllama",),
        parse=parse_mllama,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: MllamaProcessor(cfg, folder, tokenizer, notice),
        chat_template=lambda cfg: MLLAMA_CHAT_TEMPLATE,
        describe=describe,
    ),
)
