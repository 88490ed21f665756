"""Model families: one folder each, registered in one table.

A family is everything that differs between vision-language systems; everything else
(the loader, generation, chat, convert, info, bench, the backends) depends only on the
contract below and never on a family's module names.

    Family      parse(config.json dict) -> config        (through `parse_config`, validated)
                build(config, full) -> model             (called on the `meta` device)
                weight_name(checkpoint key) -> our parameter name, or None (unused)
                keep_dense(our Linear name) -> stays unquantized unless asked (`int4:all`)
                hf_skip_modules: transformers' names for those layers (written by convert)
                processor(config, folder, tokenizer, notice) -> Processor
                chat_template(config) -> the conversation format when a checkpoint has none
    Processor   prepare_images(images) -> PreparedImages (pixels, token count per image)
                build_prompt(messages, token_counts, context_length) -> PromptSequence
                (ids with image slots expanded, and the mask kind: causal or prefix(n))
    Model       an nn.Module with the seed's three stages as children `vision`, `projector`
                and `decoder`, and: encode(prepared) -> visual tokens per image;
                prefill(ids, visual, cache, start, prefix=n) -> logits;
                step(tokens, slots, cache) -> logits (capturable with tensor slots);
                new_cache(length, batch)

    model_type        family            folder        images enter as
    llava             LLaVA             llava/        tokens, one view each
    llava_next        LLaVA-NeXT        llava/        tokens, anyres tiles
    llava_onevision   LLaVA-OneVision   llava/        tokens, anyres_max_N tiles
    internvl          InternVL          internvl/     tokens, 448 px tiles + thumbnail
    paligemma         PaliGemma         paligemma/    tokens, one view; a bidirectional prefix
    qwen2_vl          Qwen2-VL          qwen2_vl/     tokens, native resolution; 3-D (M-RoPE) positions
    qwen2_5_vl        Qwen2.5-VL        qwen2_5_vl/   as Qwen2-VL (its processor and decoder); windowed ViT
    mllama            Llama 3.2 Vision  mllama/       never: cross-attention layers in the decoder
    qwen              Qwen-VL           qwen_vl/      tokens, 256 from a cross-attention resampler
    llama, qwen2 ...  text              text/         no images: a language model alone (text-only GGUF)

Adding a family: a folder with its config parsing, weight names, processor and model
assembly (from the shared blocks in vlmcli/model/), and one line in `_FAMILY_MODULES`.
Anything not in the table is refused with the list of what is, and nothing a checkpoint
ships as code (`auto_map`) is ever run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from vlmcli.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from vlmcli.config import MultiModalConfig
    from vlmcli.processor import Processor
    from vlmcli.tokenizer import Tokenizer

# The registry: each module's FAMILIES, in the order `vlm info` and errors list them.
_FAMILY_MODULES = (
    "vlmcli.families.llava", "vlmcli.families.internvl", "vlmcli.families.paligemma", "vlmcli.families.qwen2_vl",
    "vlmcli.families.qwen2_5_vl", "vlmcli.families.mllama", "vlmcli.families.text",
    "vlmcli.families.qwen_vl",
)


@dataclass(frozen=True)
class Family:
    name: str  # shown by `vlm info`
    model_types: tuple[str, ...]
    parse: Callable[[dict[str, Any]], "MultiModalConfig"]  # use parse_config(), which validates
    build: Callable[["MultiModalConfig", bool], "nn.Module"]  # (config, full vision tower) -> model
    weight_name: Callable[[str], str | None]  # checkpoint key -> our name; None: not used
    keep_dense: Callable[[str], bool]  # our Linear module name -> kept unquantized by default
    hf_skip_modules: tuple[str, ...]  # transformers' module names for the keep_dense layers
    processor: Callable[["MultiModalConfig", "Path", "Tokenizer", Callable[[str], None] | None], "Processor"]
    chat_template: Callable[["MultiModalConfig"], str | None]  # None: the family has no chat format
    describe: Callable[["MultiModalConfig"], str]  # 'LLaVA (SigLIP, MLP projector, Qwen2 decoder)'
    chat: bool = True  # False: a single-turn model (`vlm chat` says so)
    default_prompt: str | None = None  # `vlm describe` without -p; None: the command's own
    # the published checkpoints carry no template, their format is in the model's own code
    # (Qwen-VL): the family's template is the model's, not a fallback worth a notice
    template_is_the_models: bool = False
    # folder -> (tokenizers.Tokenizer, tokenizer-config defaults), for a family whose
    # checkpoints carry their vocabulary in a format of their own (Qwen-VL: tiktoken); None:
    # tokenizer.json, read by the shared Tokenizer
    vocabulary: "Callable[[Path], tuple[Any, dict]] | None" = None

    def canonical_name(self, key: str) -> str | None:
        return self.weight_name(key)


def _families() -> tuple[Family, ...]:
    return tuple(f for module in _FAMILY_MODULES for f in importlib.import_module(module).FAMILIES)


def supported_model_types() -> list[str]:
    return sorted(t for f in _families() for t in f.model_types)


def family_for(cfg: dict[str, Any]) -> Family:
    model_type = cfg.get("model_type")
    for family in _families():
        if model_type in family.model_types:
            return family
    found = f"'{model_type}'" if model_type else "no model_type"
    raise UnsupportedModelError(
        f"config.json has {found}; supported model types: {', '.join(supported_model_types())}"
    )


def parse_config(raw: dict[str, Any]) -> tuple[Family, "MultiModalConfig"]:
    """The one entry point from a config.json dict to a checked config, for every command.

    A value of the wrong type anywhere (a string where a size belongs, a list for a dict, a
    zero that something is divided by) surfaces as a CheckpointError naming config.json,
    not as a Python error."""
    family = family_for(raw)
    try:
        parsed = family.parse(raw)
        parsed.validate()
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
        raise CheckpointError(f"config.json has an invalid value ({type(e).__name__}: {e})") from None
    return family, parsed


def describe(cfg: dict[str, Any] | "MultiModalConfig") -> str:
    """Family and parts of a checkpoint, from its config.json dict or a parsed config."""
    if isinstance(cfg, dict):
        family, parsed = parse_config(cfg)
        return family.describe(parsed)
    return family_for({"model_type": cfg.model_type}).describe(cfg)
