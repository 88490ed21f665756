"""A conversation with a model: its turns, its images, and a KV cache of what has been said.

Every turn renders the whole conversation with the chat template, so the model sees exactly
what a fresh run over the same messages would see. The cache remembers which ids its
positions hold; the new rendering is compared with them, and only the ids after the longest
common prefix are prefilled. Usually that is the new user message (plus the template's
closing of the previous reply); if a template rewrites earlier turns, the prefix is shorter
and more is recomputed, never less than is right.

Images are encoded once, when added, and attached to the next user message. The session is
append-only between `clear()`s, so the k-th image placeholder of any rendering is always the
k-th visual token of the session's images, and equal ids mean equal cache contents.

No terminal code here: `vlmcli/cli/chat.py` is the terminal front end.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vlmcli.errors import ContextLengthError, UsageError, VlmError
from vlmcli.generate import SamplingOptions, Timings, generate
from vlmcli.inputs import ImageInput
from vlmcli.model.kv_cache import KVCache
from vlmcli.pipeline import Pipeline
from vlmcli.sequence import Message, assistant_message, common_prefix, user_message


# Cache slots a chat session reserves at most (llama.cpp's default context is the same):
# 4096 slots of Qwen2-0.5B's cache are 96 MB in fp32, of a 7B's 2 GB in fp16.
CHAT_CONTEXT = 4096


@dataclass
class Reply:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop", "length" (max_new_tokens) or "context" (the context is full)
    prompt_tokens: int  # the whole conversation as rendered for this turn
    reused_tokens: int  # of those, how many were already in the cache (not recomputed)
    timings: Timings = field(default_factory=Timings)


class ChatSession:
    """A multi-turn conversation over a loaded `Pipeline`.

    `ask(text)` answers one user message; `add_image(...)` attaches a picture to the next
    one; `clear()` forgets everything. A KeyboardInterrupt during `ask` leaves the session
    consistent: a partial reply is kept as the assistant's turn (if nothing was generated
    yet, the message is dropped and its images stay attached to the next one).
    """

    def __init__(self, pipe: Pipeline, opts: SamplingOptions | None = None, max_context: int = CHAT_CONTEXT):
        if not pipe.family.chat:
            raise UsageError(
                f"{pipe.family.name} models answer one prompt at a time and have no chat format",
                hint="use vlm describe IMAGE -p PROMPT",
            )
        self.pipe = pipe
        self.opts = opts or SamplingOptions()
        self.max_context = max_context
        self.messages: list[Message] = []
        self.images: list[ImageInput] = []  # every image of the conversation, in order
        self._visual: list[torch.Tensor] = []  # their visual tokens, (n_visual, d) each
        self._grids: list = []  # their patch grids, where the family lays images out (Qwen2-VL)
        # what a position adds to its cache slot after the last prompt (Qwen2-VL's M-RoPE
        # delta); every rendering's positions come from the processor, so a follow-up turn
        # continues from the cache's end with this offset
        self.position_offset = 0
        self._pending = 0  # images added since the last user message
        self._cache: KVCache | None = None
        self._cached_ids: list[int] = []  # the ids whose keys/values fill cache positions 0..n-1

    # ------------------------------------------------------------------ state

    @property
    def pending_images(self) -> list[ImageInput]:
        return self.images[len(self.images) - self._pending :] if self._pending else []

    @property
    def context_length(self) -> int:
        return min(self.pipe.context_length, self.max_context)

    @property
    def cached_tokens(self) -> int:
        return len(self._cached_ids)

    def add_image(self, image: ImageInput | str | Path) -> list[str]:
        """Load and encode an image now (errors surface here, not at the next message);
        it goes with the next user message. Returns notes such as "used the first frame"."""
        if not isinstance(image, ImageInput):
            image = ImageInput(str(image), Path(image))
        image = image.fetched()
        timings = Timings()
        prepared = self.pipe.prepare_images([image], timings)
        visual, notes = self.pipe.encode_prepared(prepared, timings), prepared.notes
        self.images.append(image)
        self._visual.append(visual[0])
        if prepared.grids is not None:
            self._grids.append(prepared.grids[0])
        self._pending += 1
        return notes

    def clear(self) -> None:
        """Forget the conversation and its images (the cache's memory is kept for reuse)."""
        self.messages = []
        self.images = []
        self._visual = []
        self._grids = []
        self._pending = 0
        self._cached_ids = []
        self.position_offset = 0

    # ------------------------------------------------------------------ a turn

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer `text` (with the pending images), streaming the reply through `on_text`."""
        pipe, opts = self.pipe, self.opts
        user = user_message(text, self._pending)
        messages = self.messages + [user]
        try:
            # each image's own count: LLaVA-NeXT / OneVision counts depend on the image
            seq = pipe.build_prompt(
                messages, [v.shape[0] for v in self._visual], self.context_length, grids=self._grids or None
            )
        except ContextLengthError as e:
            raise ContextLengthError(
                f"the conversation no longer fits the model's context: {e}",
                hint="/clear starts a new conversation",
            ) from None
        ids = seq.ids
        # Reuse the cached prefix; the last id is always fed again, for the next-token logits.
        reuse = min(common_prefix(self._cached_ids, ids), len(ids) - 1)
        visual = self._visual_tokens(ids, reuse)
        cache = self._cache_for()
        # From here on, positions from `reuse` on are being overwritten.
        self._cached_ids = ids[:reuse]

        tokens: list[int] = []
        stream = pipe.tokenizer.stream_decoder()

        def on_token(token: int) -> None:
            tokens.append(token)
            if on_text:
                piece = stream.push(token)
                if piece:
                    on_text(piece)

        def flush() -> None:
            tail = stream.flush()
            if on_text and tail:
                on_text(tail)

        positions = offset = None
        if seq.positions is not None:
            positions = seq.positions[..., reuse:]
            offset = int(seq.positions[..., -1].max()) + 1 - len(ids)
        timings = Timings()
        try:
            result = generate(
                pipe.model,
                ids[reuse:],
                visual,
                opts,
                pipe.stop_ids,
                cache,
                start_pos=reuse,
                prefix=seq.prefix,
                history=ids[:reuse],
                step=pipe.step,
                on_token=on_token,
                timings=timings,
                positions=positions,
                position_offset=offset,
            )
        except KeyboardInterrupt:
            flush()
            if tokens:  # keep what was said; the cache past `reuse` may be half written
                self.messages += [user, assistant_message(pipe.tokenizer.decode(tokens))]
                self._pending = 0
            raise
        flush()
        self.position_offset = offset or 0
        reply_text = pipe.tokenizer.decode(result.tokens)
        self.messages += [user, assistant_message(reply_text)]
        self._pending = 0
        self._cached_ids = ids + result.tokens[: result.end_pos - len(ids)]
        finish = result.finish_reason
        if finish == "length" and len(result.tokens) < opts.max_new_tokens:
            finish = "context"
        return Reply(reply_text, result.tokens, finish, len(ids), reuse, timings)

    def _visual_tokens(self, ids: list[int], start: int) -> torch.Tensor | None:
        """The visual tokens for the image placeholders in ids[start:], shaped (1, n, d)."""
        image_id = self.pipe.config.image_token_id
        skipped = ids[:start].count(image_id)
        needed = ids[start:].count(image_id)
        if not needed:
            return None
        flat = torch.cat(self._visual, dim=0)
        if flat.shape[0] != skipped + needed:
            raise VlmError(f"{skipped + needed} image placeholders but {flat.shape[0]} visual tokens")
        return flat[skipped:].unsqueeze(0)

    def _cache_for(self) -> KVCache:
        """The session's cache: allocated once, on the first message, for the whole context
        the session may use (at most `CHAT_CONTEXT` slots, so that a 128k-token model does
        not reserve 128k slots for a short chat), and written in place from then on."""
        if self._cache is None:
            self._cache = self.pipe.model.new_cache(self.context_length)
        return self._cache

    # ------------------------------------------------------------------ saving

    def transcript(self) -> dict:
        """The conversation as plain JSON data, each image part naming its file or URL."""
        images = iter(self.images)
        messages = []
        for message in self.messages:
            content = []
            for part in message["content"]:
                if part.get("type") == "image":
                    content.append({"type": "image", "image": next(images).label()})
                else:
                    content.append(dict(part))
            messages.append({"role": message["role"], "content": content})
        pending = [image.label() for image in self.pending_images]
        out = {"model": self.pipe.model_ref, "options": asdict(self.opts), "messages": messages}
        if pending:
            out["pending_images"] = pending
        return out

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        try:
            path.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise VlmError(f"cannot write '{path}': {e.strerror or e}") from None
        return path
