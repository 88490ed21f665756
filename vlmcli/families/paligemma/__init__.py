"""PaliGemma (google/paligemma-3b-*: SigLIP + Gemma) and PaliGemma 2 (google/paligemma2-*:
SigLIP + Gemma2): single-turn, prompted by task ("caption en", "answer en ...", "detect ...")."""

from __future__ import annotations

from vlmcli.config import MultiModalConfig, describe_parts
from vlmcli.families import Family
from vlmcli.families.paligemma.config import parse_paligemma
from vlmcli.families.paligemma.model import PaliGemmaModel
from vlmcli.families.paligemma.processor import DEFAULT_PROMPT, PaliGemmaProcessor
from vlmcli.families.paligemma.weights import HF_SKIP_MODULES, keep_dense, weight_name

NAME = "PaliGemma"


def build(cfg: MultiModalConfig, full: bool = False) -> PaliGemmaModel:
    """full: PaliGemma always builds every block of the vision tower."""
    return PaliGemmaModel(cfg)


FAMILIES = (
    Family(
        name=NAME,
        model_types=("paligemma",),
        parse=parse_paligemma,
        build=build,
        weight_name=weight_name,
        keep_dense=keep_dense,
        hf_skip_modules=HF_SKIP_MODULES,
        processor=lambda cfg, folder, tokenizer, notice: PaliGemmaProcessor(cfg, folder, tokenizer, NAME, notice),
        chat_template=lambda cfg: None,  # no conversation format: the processor writes the prompt
        describe=lambda cfg: describe_parts(NAME, cfg),
        chat=False,
        default_prompt=DEFAULT_PROMPT,
    ),
)
