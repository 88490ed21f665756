"""The library entry point: a loaded model with its tokenizer and image settings, and the
one call the commands make.

    image files -> preprocess -> vision -> projector -> sequence -> decoder -> sampler -> text
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import backends
from backends.base import Backend
from vlmcli import checkpoint
from vlmcli.errors import UsageError
from vlmcli.generate import CompiledStep, Generation, SamplingOptions, Timings, generate, ms_since
from vlmcli.inputs import ImageInput
from vlmcli.loader import LoadedModel, ProgressFn, load_model
from vlmcli.preprocess import load_image_with_notes
from vlmcli.processor import Notice, PreparedImages, Processor
from vlmcli.quantization import read_quantization
from vlmcli.sequence import Message, PromptSequence, count_images, user_message
from vlmcli.tokenizer import Tokenizer

ImageSource = str | Path | bytes | ImageInput  # an ImageInput's name is what errors call it


@dataclass
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int
    image_tokens: int
    finish_reason: str
    timings: Timings
    notes: list[str] = field(default_factory=list)  # e.g. "animated image: first frame used"


class Pipeline:
    def __init__(
        self,
        loaded: LoadedModel,
        tokenizer: Tokenizer,
        processor: Processor,
        backend: Backend,
        stop_ids: set[int],
        model_ref: str,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.family = loaded.family
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_config = processor.image_config
        self.backend = backend
        self.stop_ids = stop_ids
        self.model_ref = model_ref
        self.step: CompiledStep | None = None  # None: decode steps run eagerly

    def set_max_tiles(self, n: int) -> None:
        """At most `n` tiles per image, for families whose processor tiles by count."""
        setter = getattr(self.processor, "set_max_tiles", None)
        if setter is None:
            raise UsageError(
                f"--max-tiles applies to models that cut images into a number of tiles (InternVL); "
                f"{self.family.name} does not"
            )
        setter(n)

    def set_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """The pixel budget per image, for families that resize to a budget (Qwen2-VL)."""
        setter = getattr(self.processor, "set_pixels", None)
        if setter is None:
            raise UsageError(
                f"--min-pixels / --max-pixels apply to models that take images at a pixel budget (Qwen2-VL); "
                f"{self.family.name} does not"
            )
        setter(min_pixels, max_pixels)

    def compile_step(self) -> bool:
        """Decode through `torch.compile` from now on (one graph per cache length; the
        first token of each new length pays the compile). False where the model's step is
        not capturable (dynamic NTK RoPE)."""
        if not self.model.capturable:
            return False
        self.step = CompiledStep(self.model)
        return True

    @classmethod
    def load(
        cls,
        model_ref: str,
        backend: str = "auto",
        *,
        progress: ProgressFn | None = None,
        notice: Notice | None = None,
        download_progress: bool = True,
        mmproj: str | None = None,
    ) -> "Pipeline":
        """mmproj: the vision file of a GGUF model (`-m model.gguf --mmproj mmproj.gguf`)."""
        backends.get_backend(backend)  # fails before anything is read or downloaded
        folder = checkpoint.resolve(model_ref, progress=download_progress, mmproj=mmproj)
        # again, now knowing the checkpoint: auto picks a quantized checkpoint's own format
        chosen = backends.get_backend(backend, read_quantization(checkpoint.read_config(folder)))
        if notice:
            from vlmcli.gguf.source import load_notices  # nothing for a Hugging Face folder

            for line in load_notices(folder, chosen.dtype):
                notice(line)
        loaded = load_model(folder, chosen, progress=progress)
        family = loaded.family
        tokenizer = Tokenizer.from_dir(
            folder,
            default_chat_template=family.chat_template(loaded.config),
            vocabulary=family.vocabulary(folder) if family.vocabulary else None,
        )
        if tokenizer.template_source == "family default" and notice and not family.template_is_the_models:
            notice(f"{folder.name} has no chat template; using the {family.name} default")
        processor = family.processor(loaded.config, folder, tokenizer, notice)
        return cls(loaded, tokenizer, processor, chosen, _stop_ids(folder, loaded, tokenizer), model_ref)

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens per image (for LLaVA-NeXT / OneVision an upper bound: their count
        depends on the image; see `prepare_images`)."""
        return self.config.max_visual_tokens()

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def prepare_images(self, sources: list[ImageSource], timings: Timings) -> PreparedImages | None:
        """Load and preprocess image files; nothing runs on the model yet."""
        if not sources:
            return None
        t0 = time.perf_counter()
        notes: list[str] = []
        images = []
        for src in sources:
            if isinstance(src, ImageInput):
                image, image_notes = src.decoded().source
            else:
                image, image_notes = load_image_with_notes(src)
            images.append(image)
            notes.extend(image_notes)
        prepared = self.processor.prepare_images(images)
        prepared.notes = notes
        timings.preprocess_ms += (time.perf_counter() - t0) * 1000
        return prepared

    def encode_prepared(self, prepared: PreparedImages, timings: Timings):
        """Preprocessed images -> visual tokens on the backend's device: (N, n_visual,
        d_language), or for anyres families one (n_i, d_language) tensor per image."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            pixels = prepared.pixels.to(self.backend.device, self.backend.dtype)
            visual = self.model.encode(dataclasses.replace(prepared, pixels=pixels))
        timings.vision_ms += ms_since(t0, self.backend.device)
        return visual

    def encode_images(self, sources: list[ImageSource], timings: Timings) -> tuple[object, list[str]]:
        """Image files -> visual tokens (see encode_prepared) and notes about the files."""
        prepared = self.prepare_images(sources, timings)
        if prepared is None:
            return None, []
        return self.encode_prepared(prepared, timings), prepared.notes

    def build_prompt(
        self, messages: list[Message], token_counts: list[int], context_length: int | None = None, grids=None
    ) -> PromptSequence:
        """The family's prompt for `messages`, image slots sized by `token_counts` (and laid
        out on `grids`, each image's patch grid, for families whose positions need it)."""
        if grids is not None:
            return self.processor.build_prompt(messages, token_counts, context_length or self.context_length, grids=grids)
        return self.processor.build_prompt(messages, token_counts, context_length or self.context_length)

    def prepare_prompt(
        self, messages: list[Message], images: list[ImageSource], timings: Timings, context_length: int | None = None
    ) -> tuple[PromptSequence, PreparedImages | None]:
        """The prompt for `messages` with its images preprocessed, built and checked before
        the vision tower or the decoder run (what `ask` and the server's requests start with)."""
        prepared = self.prepare_images(images, timings)
        counts = prepared.token_counts if prepared is not None else [self.tokens_per_image] * count_images(messages)
        grids = prepared.grids if prepared is not None else None
        return self.build_prompt(messages, counts, context_length, grids=grids), prepared

    def ask(
        self,
        messages: list[Message],
        images: list[ImageSource],
        opts: SamplingOptions,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer the last user turn of `messages`, whose image parts refer to `images` in order."""
        timings = Timings()
        seq, prepared = self.prepare_prompt(messages, images, timings)
        visual = self.encode_prepared(prepared, timings) if prepared is not None else None
        notes = prepared.notes if prepared is not None else []
        cache_len = min(self.context_length, len(seq.ids) + opts.max_new_tokens)
        cache = self.model.new_cache(cache_len)
        stream = self.tokenizer.stream_decoder()

        def on_token(token: int) -> None:
            piece = stream.push(token)
            if piece:
                on_text(piece)

        result: Generation = generate(
            self.model, seq.ids, visual, opts, self.stop_ids, cache,
            prefix=seq.prefix, on_token=on_token if on_text else None, timings=timings, step=self.step, positions=seq.positions,
        )
        if on_text:
            tail = stream.flush()
            if tail:
                on_text(tail)
        return Answer(
            text=self.tokenizer.decode(result.tokens),
            tokens=result.tokens,
            prompt_tokens=len(seq.ids),
            image_tokens=seq.image_tokens,
            finish_reason=result.finish_reason,
            timings=timings,
            notes=notes,
        )

    def describe(
        self,
        images: list[ImageSource],
        prompt: str,
        opts: SamplingOptions,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        return self.ask([user_message(prompt, len(images))], images, opts, on_text)


def _stop_ids(folder: Path, loaded: LoadedModel, tokenizer: Tokenizer) -> set[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer."""
    ids = set(loaded.config.text.eos_token_ids)
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        eos = checkpoint.read_json(gen_path).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
