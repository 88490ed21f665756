"""The LLaVA branch: LLaVA (v1, 1.5, BakLLaVA, llava-interleave), LLaVA-NeXT, LLaVA-OneVision."""

from __future__ import annotations

from vlmcli.config import MultiModalConfig, describe_parts
from vlmcli.families import Family
from vlmcli.families.llava.config import parse_llava, parse_llava_next, parse_llava_onevision
from vlmcli.families.llava.model import LlavaModel
from vlmcli.families.llava.processor import LlavaProcessor
from vlmcli.families.llava.templates import CHATML_CHAT_TEMPLATE, LLAVA_DEFAULT_CHAT_TEMPLATE, TEMPLATE_BY_DECODER
from vlmcli.families.llava.weights import HF_SKIP_MODULES, keep_dense, weight_name


def build(cfg: MultiModalConfig, full: bool = False) -> LlavaModel:
    """full: every block of the vision tower (convert must write them all), not only those
    up to the deepest feature layer the model uses."""
    if full:
        import dataclasses

        cfg = dataclasses.replace(cfg, vision_feature_layers=(cfg.vision.n_layers,))
    return LlavaModel(cfg)


def _family(name: str, model_type: str, parse, default_template: str) -> Family:
    """default_template: the conversation format when neither the checkpoint nor its
    decoder (ChatML for Qwen2, [INST] for Mistral) says one."""
    return Family(
        name=name,
        model_types=(model_type,),
        parse=parse,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: LlavaProcessor(cfg, folder, tokenizer, name, notice),
        chat_template=lambda cfg: TEMPLATE_BY_DECODER.get(cfg.text.model_type, default_template),
        describe=lambda cfg: describe_parts(name, cfg),
    )


FAMILIES = (
    _family("LLaVA", "llava", parse_llava, LLAVA_DEFAULT_CHAT_TEMPLATE),
    _family("LLaVA-NeXT", "llava_next", parse_llava_next, LLAVA_DEFAULT_CHAT_TEMPLATE),
    _family("LLaVA-OneVision", "llava_onevision", parse_llava_onevision, CHATML_CHAT_TEMPLATE),
)
