"""PaliGemma's processor: no chat template. One prompt, its images first:

    <image> x (image_seq_length per image)  <bos>  prompt  "\n"

exactly as transformers' PaliGemmaProcessor writes it (then tokenized without adding special
tokens), and the whole of it a bidirectional prefix; the answer is generated causally after
it (PromptSequence.prefix). Images: a plain resize to the tower's square size, bicubic,
rescaled and normalised with mean = std = 0.5 (SiglipImageProcessor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from vlmcli.config import MultiModalConfig
from vlmcli.errors import CheckpointError, ContextLengthError, VlmError
from vlmcli.preprocess import BICUBIC, SIGLIP_MEAN, SIGLIP_STD, preprocess_batch
from vlmcli.processor import Notice, PreparedImages, image_settings
from vlmcli.sequence import Message, PromptSequence, count_images
from vlmcli.tokenizer import Tokenizer

DEFAULT_PROMPT = "caption en"  # the mix checkpoints' captioning task


def image_processor_defaults(cfg: MultiModalConfig) -> dict[str, Any]:
    size = cfg.vision.image_size
    return {
        "size": {"height": size, "width": size},
        "resample": BICUBIC,
        "do_center_crop": False,
        "image_mean": list(SIGLIP_MEAN),
        "image_std": list(SIGLIP_STD),
    }


def _text(messages: list[Message]) -> str:
    """The one user turn's text (PaliGemma has no conversation format)."""
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) != 1 or turns[0].get("role") != "user":
        raise VlmError("PaliGemma answers one prompt at a time: give one user message")
    content = turns[0].get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if part.get("type") == "text")


class PaliGemmaProcessor:
    def __init__(self, cfg: MultiModalConfig, folder: Path, tokenizer: Tokenizer, family_name: str, notice: Notice | None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_config, raw = image_settings(folder, image_processor_defaults(cfg), family_name, notice)
        self.tokens_per_image = cfg.max_visual_tokens()
        stated = raw.get("image_seq_length")
        if stated is not None and stated != self.tokens_per_image:
            # transformers would write `stated` placeholders for this many features, and fail
            raise CheckpointError(
                f"the image processor's image_seq_length {stated} is not the vision tower's "
                f"{self.tokens_per_image} patches",
                hint="the checkpoint is inconsistent; re-download it",
            )
        image_token = tokenizer.id_to_token(cfg.image_token_id)
        if image_token is None:
            raise CheckpointError(f"the tokenizer has no token for image_token_index {cfg.image_token_id}")
        if tokenizer.bos_token is None:
            raise CheckpointError("the tokenizer has no bos_token, which PaliGemma's prompt starts with")
        self.image_token = image_token

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        pixels = preprocess_batch(images, self.image_config)
        return PreparedImages(
            pixels,
            [(img.height, img.width) for img in images],
            [1] * len(images),
            [self.tokens_per_image] * len(images),
        )

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int) -> PromptSequence:
        n_images = count_images(messages)
        if len(token_counts) != n_images:
            raise VlmError(f"{len(token_counts)} image token counts for {n_images} images")
        if n_images == 0:
            raise VlmError("PaliGemma needs an image with its prompt")
        text = self.image_token * sum(token_counts) + self.tokenizer.bos_token + _text(messages) + "\n"
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        image_tokens = ids.count(self.cfg.image_token_id)
        if image_tokens != sum(token_counts):
            raise VlmError(f"the prompt holds {image_tokens} image placeholders for {sum(token_counts)} visual tokens")
        if len(ids) >= context_length:
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens ({image_tokens} of them for "
                f"{n_images} image(s)) but the model's context is {context_length} tokens"
            )
        return PromptSequence(ids=ids, image_tokens=image_tokens, n_images=n_images, prefix=len(ids))
