"""Messages and images -> the decoder's input ids, with every image slot sized to its
visual tokens.

The chat template writes one image placeholder token per image; each becomes as many
placeholder ids as the image has visual tokens, and the model later scatters the projected
features over exactly those positions. Counts are checked here, before any forward pass.

A plain LLaVA gives every image the same count; LLaVA-NeXT and OneVision give each image
its own (it depends on the image's size), so counts may be one number or one per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from vlmcli.errors import ContextLengthError, VlmError
from vlmcli.tokenizer import Tokenizer

Message = dict[str, Any]


def user_message(text: str, n_images: int = 0) -> Message:
    """A user turn in the structured form processors take: images first, then the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def assistant_message(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def count_images(messages: list[Message]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image"
    )


@dataclass(frozen=True)
class PromptSequence:
    ids: list[int]  # with image slots expanded
    image_tokens: int  # placeholder ids in `ids` (visual tokens of all images)
    n_images: int
    # prefix-LM (PaliGemma): the first `prefix` ids attend to each other both ways; 0 is causal
    prefix: int = 0
    # RoPE positions of `ids` when they are not 0..n-1: a LongTensor (3, n) for Qwen2-VL's
    # multimodal RoPE (images laid out on their grid); None: the cache slots
    positions: Any = None


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items two sequences share (prompt slots a cache already holds)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def expand_image_slots(ids: list[int], image_token_id: int, tokens_per_image: int | Sequence[int]) -> list[int]:
    """Each placeholder id -> that image's count of placeholder ids (the k-th placeholder
    takes the k-th count when counts are given per image)."""
    counts = None if isinstance(tokens_per_image, int) else list(tokens_per_image)
    out: list[int] = []
    k = 0
    for i in ids:
        if i == image_token_id:
            n = tokens_per_image if counts is None else counts[k]
            out.extend([image_token_id] * n)
            k += 1
        else:
            out.append(i)
    return out


def build_sequence(
    tokenizer: Tokenizer,
    messages: list[Message],
    *,
    image_token_id: int,
    tokens_per_image: int | Sequence[int],
    context_length: int,
    add_generation_prompt: bool = True,
) -> PromptSequence:
    """tokens_per_image: one count for every image, or one count per image in prompt order."""
    n_images = count_images(messages)
    if not isinstance(tokens_per_image, int) and len(tokens_per_image) != n_images:
        raise VlmError(f"{len(tokens_per_image)} image token counts for {n_images} images")
    ids = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    slots = ids.count(image_token_id)
    if slots != n_images:
        raise VlmError(
            f"the chat template wrote {slots} image placeholders for {n_images} images; "
            f"the model's template does not place images where vlm expects them"
        )
    ids = expand_image_slots(ids, image_token_id, tokens_per_image)
    image_tokens = n_images * tokens_per_image if isinstance(tokens_per_image, int) else sum(tokens_per_image)
    # At least one position must stay free for the answer.
    if len(ids) >= context_length:
        raise ContextLengthError(
            f"the prompt is {len(ids)} tokens ({image_tokens} of them for "
            f"{n_images} image(s)) but the model's context is {context_length} tokens"
        )
    return PromptSequence(ids=ids, image_tokens=image_tokens, n_images=n_images)
