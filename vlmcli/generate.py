"""Prefill, then decode one token at a time: sampling as small pure functions, stop
conditions, streaming through a callback.

The logits processors run in transformers' order (repetition penalty, temperature, top-k,
top-p) with its semantics, so a seed and a set of options mean the same thing in both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmcli.model.kv_cache import KVCache
from vlmcli.model.multimodal import VisionLanguageModel


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy: the argmax, deterministic
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the sequence
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: a seen token's logit is divided by `penalty` if positive, else multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    seen = seen[seen < logits.shape[-1]]  # image placeholders may lie past the vocabulary
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor, seen: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None
) -> int:
    """logits (vocab,) of the last position -> the next token id."""
    logits = apply_repetition_penalty(logits.float(), seen, opts.repetition_penalty)
    if opts.greedy:
        return int(logits.argmax())
    logits = logits / opts.temperature
    logits = top_p_filter(top_k_filter(logits, opts.top_k), opts.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens: int = 0  # single-token forward passes timed in decode_ms
    first_token_at: float = 0.0  # time.perf_counter() when the first token was chosen

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "preprocess_ms": round(self.preprocess_ms, 3),
            "vision_ms": round(self.vision_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (an end-of-sequence token) or "length"
    end_pos: int = 0  # cache positions in use after the last token fed back


def ms_since(t0: float, device: torch.device | None = None) -> float:
    """Milliseconds since `t0`, once `device`'s queued work has finished (GPU kernels run
    after the Python call returns; without the wait a stage's time would land in the next)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000


class CompiledStep:
    """`model.step` under `torch.compile`, with the slot as a device tensor, so one graph
    serves every token of every generation on caches of one size (the cache is an input
    of the graph, written in place; its length fixes the attention's shapes). A cache of
    another length compiles once more; `compiles` counts how often that happened."""

    def __init__(self, model, **compile_options):
        self.model = model
        self._fn = torch.compile(model.step, dynamic=False, **compile_options)
        self._lengths: set[int] = set()

    @property
    def compiles(self) -> int:
        return len(self._lengths)

    def __call__(
        self, tokens: torch.Tensor, slot: int, cache: KVCache, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """positions: the step's RoPE position as a device tensor (1,) where it is not the
        slot (Qwen2-VL after an image), an input of the graph like the slot."""
        self._lengths.add(cache.max_len)
        slots = torch.tensor([slot], device=tokens.device)
        if positions is None:
            return self._fn(tokens, slots, cache)
        return self._fn(tokens, slots, cache, positions)


@torch.inference_mode()
def generate(
    model: VisionLanguageModel,
    input_ids: list[int],
    visual_tokens: torch.Tensor | None,
    opts: SamplingOptions,
    stop_ids: set[int],
    cache: KVCache,
    *,
    start_pos: int = 0,
    prefix: int = 0,
    history: list[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    timings: Timings | None = None,
    step: Callable[[torch.Tensor, int, KVCache], torch.Tensor] | None = None,
    positions: torch.Tensor | None = None,
    position_offset: int | None = None,
) -> Generation:
    """Prefill `input_ids` (with `visual_tokens` in their image slots) at cache position
    `start_pos`, then decode until a stop token or max_new_tokens.

    `prefix`: slots 0..prefix-1 attend both ways (PaliGemma's image + prompt). `history`
    is the ids already in the cache before start_pos (chat turns), used only by the
    repetition penalty. A stop token ends generation and is not returned; `on_token` is
    called with each returned token as soon as it is chosen. `step`: how one token is
    decoded (a CompiledStep); by default `model.step`, eagerly. `positions`: the RoPE
    positions of `input_ids` when they are not their slots ((3, T) for Qwen2-VL);
    `position_offset`: what a decoded token's position adds to its slot (Qwen2-VL's
    delta, max position + 1 - prompt length; derived from `positions` when not given).
    """
    timings = timings if timings is not None else Timings()
    step = step or model.step
    device = model.decoder.embed_tokens.weight.device
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    ids = torch.tensor([input_ids], device=device)
    seen = torch.tensor((history or []) + input_ids, device=device)

    t0 = time.perf_counter()
    if positions is not None:
        positions = torch.as_tensor(positions, device=device)
        if position_offset is None:  # the last id is text: its position is the largest
            position_offset = int(positions[..., -1].max()) + 1 - (start_pos + len(input_ids))
        logits = model.prefill(ids, visual_tokens, cache, start_pos, prefix=prefix, positions=positions)[0]
    else:
        logits = model.prefill(ids, visual_tokens, cache, start_pos, prefix=prefix)[0]
    offset = position_offset or 0
    timings.prefill_ms += ms_since(t0, device)

    out = Generation()
    pos = start_pos + len(input_ids)
    t0 = time.perf_counter()
    for n in range(opts.max_new_tokens):
        token = next_token(logits, seen, opts, generator)
        if n == 0:
            timings.first_token_at = time.perf_counter()
        if token in stop_ids:
            out.finish_reason = "stop"
            break
        out.tokens.append(token)
        if on_token:
            on_token(token)
        if n == opts.max_new_tokens - 1:
            break  # the last token needs no forward pass of its own
        if pos >= cache.max_len:
            break  # context full: reported as "length"
        seen = torch.cat([seen, torch.tensor([token], device=device)])
        if offset:
            at = torch.tensor([pos + offset], device=device)
            logits = step(torch.tensor([[token]], device=device), pos, cache, positions=at)[0]
        else:
            logits = step(torch.tensor([[token]], device=device), pos, cache)[0]
        pos += 1
        timings.decode_tokens += 1  # forward passes after the prefill
    timings.decode_ms += ms_since(t0, device)
    out.end_pos = pos
    return out
