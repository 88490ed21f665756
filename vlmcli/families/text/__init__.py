"""A language model alone (Llama, Mistral, Qwen2, Gemma): `vlm chat` without images.

What a text-only GGUF (`-m model.gguf` without `--mmproj`) and a Hugging Face causal-LM
folder (model_type llama / qwen2 / gemma ..., `model.*` and `lm_head` tensors) run as: the
shared decoder with no vision tower or projector. Images are refused in one line, naming
what is missing (for a GGUF, its mmproj file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlmcli.config import SUPPORTED_TEXT_MODEL_TYPES, DECODER_NAMES, MultiModalConfig, ProjectionConfig, VisionConfig, text_from_hf
from vlmcli.errors import CheckpointError
from vlmcli.families import Family
from vlmcli.families.renames import Renames, prefixes
from vlmcli.model.decoder import Decoder
from vlmcli.model.multimodal import VisionLanguageModel
from vlmcli.processor import PreparedImages
from vlmcli.sequence import Message, PromptSequence, count_images
from vlmcli.errors import ContextLengthError


def parse(cfg: dict) -> MultiModalConfig:
    text = text_from_hf(cfg)
    # The vision and projection parts are placeholders: nothing is built from them.
    return MultiModalConfig(
        model_type=cfg["model_type"],
        vision=VisionConfig(),
        projection=ProjectionConfig(d_vision=VisionConfig().d_vision, d_language=text.d_model),
        text=text,
        image_token_id=0,
        raw=cfg,
    )


class TextModel(VisionLanguageModel):
    """The decoder alone; `vision` and `projector` are None."""

    def __init__(self, cfg: MultiModalConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.vision = None
        self.projector = None
        self.decoder = Decoder(cfg.text)

    def encode(self, prepared):
        raise CheckpointError("this model has no vision tower")

    def embed(self, input_ids: torch.Tensor, visual_tokens=None) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)


def _gguf_name(folder: Path) -> str | None:
    """The model file's name when `folder` presents a GGUF (vlmcli/gguf/source.py)."""
    marker = folder / "gguf_files.json"
    if not marker.exists():
        return None
    import json

    return Path(json.loads(marker.read_text())["model"]).name


def no_images_message(folder: Path) -> str:
    name = _gguf_name(folder)
    if name is not None:
        return f"{name} is a language model only; images need its vision projector: add --mmproj MMPROJ.gguf"
    return f"{folder.name} is a language model only (no vision tower); it cannot take images"


class TextProcessor:
    image_config = None

    def __init__(self, cfg: MultiModalConfig, folder: Path, tokenizer):
        self.cfg = cfg
        self.folder = folder
        self.tokenizer = tokenizer

    def prepare_images(self, images) -> PreparedImages:
        raise CheckpointError(no_images_message(self.folder))

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int) -> PromptSequence:
        if count_images(messages):
            raise CheckpointError(no_images_message(self.folder))
        if self.tokenizer.chat_template is None:  # a language model has no family default to fall back on
            name = _gguf_name(self.folder) or self.folder.name
            where = "tokenizer.chat_template" if _gguf_name(self.folder) else "chat_template.jinja / tokenizer_config.json"
            raise CheckpointError(f"{name} has no chat template ({where}), so vlm cannot write a chat prompt for it")
        # a language model's template takes each message's text as a string
        flat = [{**m, "content": _text_of(m.get("content"))} for m in messages]
        ids = self.tokenizer.encode_chat(flat)
        if len(ids) >= context_length:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens but the model's context is {context_length} tokens")
        return PromptSequence(ids=ids, image_tokens=0, n_images=0)


def _text_of(content) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


FAMILIES = (
    Family(
        name="Language model",
        model_types=SUPPORTED_TEXT_MODEL_TYPES,
        parse=parse,
        build=lambda cfg, full=False: TextModel(cfg),
        # transformers' causal-LM names: model.* is the decoder, lm_head its head
        weight_name=Renames((r"^lm_head\.", "decoder.lm_head."), (r"^model\.", "decoder.")),
        keep_dense=prefixes("decoder.lm_head"),
        hf_skip_modules=("lm_head",),
        processor=lambda cfg, folder, tokenizer, notice: TextProcessor(cfg, folder, tokenizer),
        chat_template=lambda cfg: None,
        describe=lambda cfg: f"{DECODER_NAMES.get(cfg.text.model_type, cfg.text.model_type)} language model (no vision)",
    ),
)
