"""Messages and images -> the decoder's input ids, with every image slot sized to its
visual tokens.

The chat template writes one image placeholder token per image; each becomes as many
placeholder ids as the image has visual tokens, and the model later scatters the projected
features over exactly those positions. Counts are checked here, before any forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def expand_image_slots(ids: list[int], image_token_id: int, tokens_per_image: int) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i == image_token_id:
            out.extend([image_token_id] * tokens_per_image)
        else:
            out.append(i)
    return out


def build_sequence(
    tokenizer: Tokenizer,
    messages: list[Message],
    *,
    image_token_id: int,
    tokens_per_image: int,
    context_length: int,
    add_generation_prompt: bool = True,
) -> PromptSequence:
    n_images = count_images(messages)
    ids = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    slots = ids.count(image_token_id)
    if slots != n_images:
        raise VlmError(
            f"the chat template wrote {slots} image placeholders for {n_images} images; "
            f"the model's template does not place images where vlm expects them"
        )
    ids = expand_image_slots(ids, image_token_id, tokens_per_image)
    # At least one position must stay free for the answer.
    if len(ids) >= context_length:
        raise ContextLengthError(
            f"the prompt is {len(ids)} tokens ({n_images * tokens_per_image} of them for "
            f"{n_images} image(s)) but the model's context is {context_length} tokens"
        )
    return PromptSequence(ids=ids, image_tokens=n_images * tokens_per_image, n_images=n_images)
