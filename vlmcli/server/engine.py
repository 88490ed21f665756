"""Continuous batching over the shared model: one thread owns the model and a KV cache with
one row per sequence; requests join the running batch at step boundaries and leave it as
soon as they finish.

    accept   reserve(): a place in the system (decoding or waiting), else QueueFull (503)
    join     between two steps: encode the images, prefill the prompt into a free cache row,
             sample its first token (the same prefill and sampler `vlm describe` runs)
    step     one forward pass for every sequence in the batch: tokens (B, 1) at their own
             slots (B, 1), each row attending to its own keys only
    leave    a stop token, a stop string, max_tokens, a full row, or a cancelled request
             (a client that went away); the rows after it move down, so the batch's rows
             stay 0..B-1, and its row keeps what it holds for a later request

Prefix reuse: a free row remembers what its cache slots hold (the ids of the prompt and
answer that left it, each image's slots tagged by a digest of its pixels). A joining request
takes the free row whose contents share the longest prefix with its prompt and prefills only
the rest, as `vlm chat` does between turns: the next request of a conversation recomputes
its new message, not the history and its images. Only for causal prompts (a prefix-LM
prompt's early slots depend on what follows them).

Rows never see each other: the mask of a row hides every slot past its own, so a greedy
answer is the same alone or in a batch. Events go back to the request's asyncio loop
through a callback (`Job.sink`), called on the engine thread.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmcli.generate import SamplingOptions, Timings, next_token
from vlmcli.model.multimodal import flatten_visual
from vlmcli.pipeline import Pipeline
from vlmcli.processor import PreparedImages
from vlmcli.sequence import PromptSequence, common_prefix
from vlmcli.server.stops import StopFilter

log = logging.getLogger("vlm.serve")

# Cache slots per sequence at most (as `vlm chat`): a prompt and its answer must fit in one row.
SERVE_CONTEXT = 4096


class QueueFull(Exception):
    """Every place in the batch and the waiting queue is taken."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    text: str  # the whole answer (what the deltas add up to)
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int
    tokens: list[int] = field(default_factory=list)  # the generated ids, a stop token not included
    cached_tokens: int = 0  # prompt tokens whose keys and values were already in the row


@dataclass
class Failed:
    message: str


Event = Delta | Finished | Failed


@dataclass(eq=False)  # a job is itself, whatever its fields
class Job:
    """One request: its prompt, built and checked before it reaches the engine."""

    seq: PromptSequence
    prepared: PreparedImages | None
    opts: SamplingOptions
    sink: Callable[[Event], None]
    stops: list[str] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False  # it has left the engine (its place given back, its last event sent)
    # the engine's state for it
    pos: int = 0  # cache slots in use
    reused: int = 0  # of the prompt's slots, how many a previous request had filled
    content: list = field(default_factory=list)  # what each prompt slot holds (see _contents)
    offset: int = 0  # what a decoded token's RoPE position adds to its slot (Qwen2-VL)
    tokens: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # the next token's, from the last forward pass
    generator: torch.Generator | None = None
    decoder: object = None  # the tokenizer's StreamDecoder
    stop_filter: StopFilter | None = None
    sent: list[str] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    def cancel(self) -> None:
        """Leave the batch at the next step boundary (safe from any thread)."""
        self.cancelled = True


class Engine:
    def __init__(self, pipe: Pipeline, max_batch: int = 8, max_queue: int = 32, context: int = SERVE_CONTEXT):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.pipe = pipe
        self.model = pipe.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = min(pipe.context_length, context)
        self.device = self.model.decoder.embed_tokens.weight.device
        self.cache = self.model.new_cache(self.context, batch=max_batch)
        self.cache.view(slice(0, 1))  # a family whose cache has no per-row views says so now, not per request
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # the batch: the job at index i owns cache row i
        # what each free row's slots hold (see _contents); rows of the batch are being written
        self._resident: list[list] = [[] for _ in range(max_batch)]
        self._reserved = 0  # accepted and not yet finished (preparing, waiting or decoding)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched decode steps run (for /health and benchmarks)

    # ------------------------------------------------------------------ requests' side

    def reserve(self) -> None:
        """Take a place for a request about to be prepared (raises QueueFull / ShuttingDown);
        give it back with `release` if the request never becomes a Job."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown
            if self._reserved >= self.max_batch + self.max_queue:
                raise QueueFull
            self._reserved += 1

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1

    def submit(self, job: Job) -> None:
        """Queue a job (its place reserved); it joins the batch at the next step boundary."""
        with self._lock:
            if self._stopping:
                self._reserved -= 1
                raise ShuttingDown
            self._waiting.append(job)
            self._lock.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            # in_flight: accepted and not finished (being prepared, waiting or decoding)
            return {
                "active": len(self._active),
                "waiting": len(self._waiting),
                "in_flight": self._reserved,
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
            }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left and end the thread."""
        with self._lock:
            self._stopping = True
            for job in list(self._waiting) + self._active:
                job.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._active and not self._waiting and not self._stopping:
                        self._lock.wait()
                    if self._stopping and not self._active and not self._waiting:
                        return
                    joining = []
                    while self._waiting and len(self._active) + len(joining) < self.max_batch:
                        joining.append(self._waiting.popleft())
                try:
                    for job in joining:
                        self._join(job)
                    self._sample_all()
                    if self._active:
                        self._step()
                except Exception as e:  # a bug: fail what is running, keep serving
                    log.exception("engine step failed")
                    for job in self._active + [j for j in joining if j not in self._active]:
                        if not job.done:
                            self._leave(job, Failed(_describe_failure(e)))
                    self._active = []
                    self._resident = [[] for _ in range(self.max_batch)]  # rows in an unknown state

    def _join(self, job: Job) -> None:
        """Prefill a job into the next free row, as `generate` prefills (same call, same
        positions), and keep its next-token logits."""
        if job.cancelled:
            return self._leave(job, None)
        row = len(self._active)
        seq, pipe = job.seq, self.pipe
        try:
            job.content = _contents(seq.ids, pipe.config.image_token_id, job.prepared)
            reuse = self._take_row(row, job) if not seq.prefix else 0
            visual = self._visual_after(job, reuse)
            ids = torch.tensor([seq.ids[reuse:]], device=self.device)
            cache = self.cache.view(slice(row, row + 1))
            t0 = time.perf_counter()
            if seq.positions is not None:
                positions = torch.as_tensor(seq.positions, device=self.device)
                job.offset = int(positions[..., -1].max()) + 1 - len(seq.ids)
                logits = self.model.prefill(ids, visual, cache, reuse, prefix=seq.prefix, positions=positions[..., reuse:])
            else:
                logits = self.model.prefill(ids, visual, cache, reuse, prefix=seq.prefix)
            job.timings.prefill_ms += (time.perf_counter() - t0) * 1000
        except Exception as e:  # a bug or out of memory: this request fails, the others go on
            log.exception("prefill failed")
            return self._leave(job, Failed(_describe_failure(e)))
        job.logits = logits[0]
        job.pos = len(seq.ids)
        job.reused = reuse
        if job.opts.seed is not None:
            job.generator = torch.Generator(device=self.device).manual_seed(job.opts.seed)
        job.decoder = pipe.tokenizer.stream_decoder()
        job.stop_filter = StopFilter(job.stops)
        self._active.append(job)

    def _take_row(self, row: int, job: Job) -> int:
        """Put the free row whose contents share the longest prefix with the job's prompt at
        `row` (the batch's next row); how many of the prompt's slots it already holds. The
        last prompt id is always fed again, for the next-token logits."""
        best, best_len = row, 0
        for r in range(row, self.max_batch):
            n = common_prefix(self._resident[r], job.content)
            if n > best_len:
                best, best_len = r, n
        if best != row:
            self._swap_rows(row, best, max(len(self._resident[row]), len(self._resident[best])))
        self._resident[row] = []  # being written from here on
        return min(best_len, len(job.content) - 1)

    def _visual_after(self, job: Job, reuse: int):
        """The visual tokens of the image slots in the prompt from slot `reuse` on: none to
        compute when every image is in the reused prefix."""
        if job.prepared is None:
            return None
        image_id = self.pipe.config.image_token_id
        needed = job.seq.ids[reuse:].count(image_id)
        if not needed:
            return None
        visual = self.pipe.encode_prepared(job.prepared, job.timings)
        if not reuse:
            return visual
        return flatten_visual(visual)[-needed:].unsqueeze(0)

    def _swap_rows(self, a: int, b: int, length: int) -> None:
        if a == b or length == 0:
            return
        for buf in (self.cache.k, self.cache.v):
            held = buf[:, a, :, :length].clone()
            buf[:, a, :, :length] = buf[:, b, :, :length]
            buf[:, b, :, :length] = held
        self._resident[a], self._resident[b] = self._resident[b], self._resident[a]

    def _sample_all(self) -> None:
        """Each job's next token from its logits; the jobs that finish leave the batch."""
        staying: list[tuple[int, Job]] = []  # (row, job)
        nothing = torch.empty(0, dtype=torch.long, device=self.device)
        for row, job in enumerate(self._active):
            if job.cancelled:
                self._leave(job, None)
                continue
            finish = self._take(job, next_token(job.logits, nothing, job.opts, job.generator))
            if finish is None:
                staying.append((row, job))
            else:
                self._leave(job, self._finished(job, finish))
        # compact: the staying jobs keep their order, each moving down into row i; the row
        # it moves into held a job that left, whose contents move up into the free rows
        for i, (old, job) in enumerate(staying):
            self._swap_rows(i, old, max(job.pos, len(self._resident[i])))
        self._active = [job for _, job in staying]

    def _take(self, job: Job, token: int) -> str | None:
        """Record a sampled token; the finish reason if the job is done, else None."""
        if token in self.pipe.stop_ids:
            return "stop"
        job.tokens.append(token)
        piece = job.stop_filter.push(job.decoder.push(token))
        if piece:
            job.sent.append(piece)
            job.sink(Delta(piece))
        if job.stop_filter.stopped:
            return "stop"
        if len(job.tokens) >= job.opts.max_new_tokens or job.pos >= self.context:
            return "length"
        return None

    def _finished(self, job: Job, reason: str) -> Finished:
        if not job.stop_filter.stopped:
            tail = job.stop_filter.push(job.decoder.flush()) + job.stop_filter.flush()
            if tail:
                job.sent.append(tail)
                job.sink(Delta(tail))
        if job.stop_filter.stopped:
            text = "".join(job.sent)
        else:  # the pipeline's own decoding of the tokens, as `vlm describe` prints it
            text = self.pipe.tokenizer.decode(job.tokens)
        return Finished(
            reason, text, len(job.seq.ids), len(job.tokens), job.seq.image_tokens, list(job.tokens), job.reused
        )

    def _step(self) -> None:
        """One decode step for the whole batch."""
        jobs = self._active
        n = len(jobs)
        tokens = torch.tensor([[job.tokens[-1]] for job in jobs], device=self.device)
        slots = torch.tensor([[job.pos] for job in jobs], device=self.device)  # (B, 1)
        length = max(job.pos for job in jobs) + 1
        cache = self.cache.view(slice(0, n), length)
        try:
            if any(job.offset for job in jobs):
                offsets = torch.tensor([[job.offset] for job in jobs], device=self.device)
                logits = self.model.step(tokens, slots, cache, positions=slots + offsets)
            else:
                logits = self.model.step(tokens, slots, cache)
        except Exception as e:
            log.exception("decode step failed")
            for job in jobs:
                self._leave(job, Failed(_describe_failure(e)))
            self._active = []
            return
        self.steps += 1
        for i, job in enumerate(jobs):
            job.logits = logits[i]
            job.pos += 1
            job.timings.decode_tokens += 1

    def _leave(self, job: Job, event: Event | None) -> None:
        if job.done:
            return
        job.done = True
        if job in self._active:  # its row keeps what it wrote, for a later request
            written = job.content + job.tokens
            self._resident[self._active.index(job)] = written[: job.pos] if job.pos else []
        with self._lock:
            self._reserved -= 1
        if event is not None:
            job.sink(event)
        elif job.cancelled:
            job.sink(Failed("the request was cancelled"))


def _contents(ids: list[int], image_id: int, prepared: PreparedImages | None) -> list:
    """What each slot of a prompt holds: its id, or for an image placeholder (digest of the
    image's pixels, index in the image), so that two prompts share a prefix only where
    their texts and images are the same."""
    if prepared is None or image_id not in ids:
        return list(ids)
    slots = iter([(d, j) for d, n in zip(_image_digests(prepared), prepared.token_counts) for j in range(n)])
    return [next(slots) if i == image_id else i for i in ids]


def _image_digests(prepared: PreparedImages) -> list[str]:
    """One digest per image of its preprocessed pixels (and its size and patch grid, which
    the pixels alone may not tell apart)."""
    # rows of `pixels` per image: its views, or its patches where images are patch lists (Qwen2-VL)
    rows = [t * h * w for t, h, w in prepared.grids] if prepared.grids else list(prepared.views_per_image)
    n = len(prepared.image_sizes)
    if sum(rows) != prepared.pixels.shape[0]:  # another layout: one digest of them all, per image
        whole = _digest(prepared.pixels, prepared.image_sizes, prepared.token_counts)
        return [f"{whole}/{i}" for i in range(n)]
    return [
        _digest(v, prepared.image_sizes[i], prepared.token_counts[i], prepared.grids and prepared.grids[i])
        for i, v in enumerate(prepared.pixels.split(rows))
    ]


def _digest(pixels: torch.Tensor, *shape_facts) -> str:
    h = hashlib.blake2b(pixels.contiguous().numpy().tobytes(), digest_size=16)
    h.update(repr(shape_facts).encode())
    return h.hexdigest()


def _describe_failure(e: Exception) -> str:
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return "out of memory while generating"
    return f"internal error: {type(e).__name__}"
