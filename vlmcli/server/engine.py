"""Continuous batching over the shared model: one thread owns the model and a KV cache with
one row per sequence; requests join the running batch at step boundaries and leave it as
soon as they finish.

    accept   reserve(): a place in the system (decoding or waiting), else QueueFull (503)
    join     between two steps: encode the images, prefill the prompt into a free cache row,
             sample its first token (the same prefill and sampler `vlm describe` runs)
    step     one forward pass for every sequence in the batch: tokens (B, 1) at their own
             slots (B, 1), each row attending to its own keys only
    leave    a stop token, a stop string, max_tokens, a full row, or a cancelled request
             (a client that went away); the last row moves into the freed one, so the
             batch's rows stay 0..B-1

Rows never see each other: the mask of a row hides every slot past its own, so a greedy
answer is the same alone or in a batch. Events go back to the request's asyncio loop
through a callback (`Job.sink`), called on the engine thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmcli.generate import SamplingOptions, Timings, next_token
from vlmcli.pipeline import Pipeline
from vlmcli.processor import PreparedImages
from vlmcli.sequence import PromptSequence
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
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # the batch: the job at index i owns cache row i
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

    def _join(self, job: Job) -> None:
        """Prefill a job into the next free row, as `generate` prefills (same call, same
        positions), and keep its next-token logits."""
        if job.cancelled:
            return self._leave(job, None)
        row = len(self._active)
        seq, pipe = job.seq, self.pipe
        try:
            visual = pipe.encode_prepared(job.prepared, job.timings) if job.prepared is not None else None
            ids = torch.tensor([seq.ids], device=self.device)
            cache = self.cache.view(slice(row, row + 1))
            t0 = time.perf_counter()
            if seq.positions is not None:
                positions = torch.as_tensor(seq.positions, device=self.device)
                job.offset = int(positions[..., -1].max()) + 1 - len(seq.ids)
                logits = self.model.prefill(ids, visual, cache, 0, prefix=seq.prefix, positions=positions)
            else:
                logits = self.model.prefill(ids, visual, cache, 0, prefix=seq.prefix)
            job.timings.prefill_ms += (time.perf_counter() - t0) * 1000
        except Exception as e:  # a bug or out of memory: this request fails, the others go on
            log.exception("prefill failed")
            return self._leave(job, Failed(_describe_failure(e)))
        job.logits = logits[0]
        job.pos = len(seq.ids)
        if job.opts.seed is not None:
            job.generator = torch.Generator(device=self.device).manual_seed(job.opts.seed)
        job.decoder = pipe.tokenizer.stream_decoder()
        job.stop_filter = StopFilter(job.stops)
        self._active.append(job)

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
        # compact: the staying jobs keep their order, each moving down into row i
        for i, (old, job) in enumerate(staying):
            if old != i:
                self.cache.k[:, i, :, : job.pos] = self.cache.k[:, old, :, : job.pos]
                self.cache.v[:, i, :, : job.pos] = self.cache.v[:, old, :, : job.pos]
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
        return Finished(reason, text, len(job.seq.ids), len(job.tokens), job.seq.image_tokens, list(job.tokens))

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
        with self._lock:
            self._reserved -= 1
        if event is not None:
            job.sink(event)
        elif job.cancelled:
            job.sink(Failed("the request was cancelled"))


def _describe_failure(e: Exception) -> str:
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return "out of memory while generating"
    return f"internal error: {type(e).__name__}"
