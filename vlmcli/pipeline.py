"""The library entry point: a loaded model with its tokenizer and image settings, and the
one call the commands make.

    image files -> preprocess -> vision -> projector -> sequence -> decoder -> sampler -> text
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import backends
from backends.base import Backend
from vlmcli import checkpoint
from vlmcli.generate import Generation, SamplingOptions, Timings, generate
from vlmcli.inputs import ImageInput
from vlmcli.loader import LoadedModel, ProgressFn, load_model
from vlmcli.preprocess import ImageProcessorConfig, load_image_with_notes, preprocess_batch
from vlmcli.quantization import read_quantization
from vlmcli.sequence import Message, build_sequence, user_message
from vlmcli.tokenizer import Tokenizer

Notice = Callable[[str], None]  # one line for stderr
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
        image_config: ImageProcessorConfig,
        backend: Backend,
        stop_ids: set[int],
        model_ref: str,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.backend = backend
        self.stop_ids = stop_ids
        self.model_ref = model_ref

    @classmethod
    def load(
        cls,
        model_ref: str,
        backend: str = "auto",
        *,
        progress: ProgressFn | None = None,
        notice: Notice | None = None,
        download_progress: bool = True,
    ) -> "Pipeline":
        backends.get_backend(backend)  # fails before anything is read or downloaded
        folder = checkpoint.resolve(model_ref, progress=download_progress)
        # again, now knowing the checkpoint: auto picks a quantized checkpoint's own format
        chosen = backends.get_backend(backend, read_quantization(checkpoint.read_config(folder)))
        loaded = load_model(folder, chosen, progress=progress)
        family = loaded.family
        tokenizer = Tokenizer.from_dir(folder, default_chat_template=family.default_chat_template)
        if tokenizer.template_source == "family default" and notice:
            notice(f"{folder.name} has no chat template; using the {family.name} default")
        image_config = _image_config(folder, loaded, notice)
        return cls(loaded, tokenizer, image_config, chosen, _stop_ids(folder, loaded, tokenizer), model_ref)

    @property
    def tokens_per_image(self) -> int:
        return self.config.max_visual_tokens()

    @property
    def context_length(self) -> int:
        return self.config.text.max_position_embeddings

    def encode_images(self, sources: list[ImageSource], timings: Timings) -> tuple[torch.Tensor | None, list[str]]:
        """Image files -> visual tokens (N, n_visual, d_language), on the backend's device."""
        if not sources:
            return None, []
        t0 = time.perf_counter()
        notes: list[str] = []
        images = []
        for src in sources:
            if isinstance(src, ImageInput):
                image, image_notes = load_image_with_notes(src.fetched().source, name=src.name)
            else:
                image, image_notes = load_image_with_notes(src)
            images.append(image)
            notes.extend(image_notes)
        pixels = preprocess_batch(images, self.image_config)
        timings.preprocess_ms += (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        with torch.inference_mode():
            pixels = pixels.to(self.backend.device, self.backend.dtype)
            visual = self.model.encode_images(pixels)
        timings.vision_ms += (time.perf_counter() - t0) * 1000
        return visual, notes

    def ask(
        self,
        messages: list[Message],
        images: list[ImageSource],
        opts: SamplingOptions,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer the last user turn of `messages`, whose image parts refer to `images` in order."""
        timings = Timings()
        seq = build_sequence(
            self.tokenizer,
            messages,
            image_token_id=self.config.image_token_id,
            tokens_per_image=self.tokens_per_image,
            context_length=self.context_length,
        )
        visual, notes = self.encode_images(images, timings)
        cache_len = min(self.context_length, len(seq.ids) + opts.max_new_tokens)
        cache = self.model.decoder.new_cache(cache_len)
        stream = self.tokenizer.stream_decoder()
        on_token = None
        if on_text:
            def on_token(token: int) -> None:
                piece = stream.push(token)
                if piece:
                    on_text(piece)
        result: Generation = generate(
            self.model, seq.ids, visual, opts, self.stop_ids, cache, on_token=on_token, timings=timings
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


def _image_config(folder: Path, loaded: LoadedModel, notice: Notice | None) -> ImageProcessorConfig:
    path = folder / "preprocessor_config.json"
    if path.exists():
        return ImageProcessorConfig.from_file(path)
    size = loaded.config.vision.image_size
    if notice:
        notice(f"{folder.name} has no preprocessor_config.json; using the {loaded.family.name} default")
    return ImageProcessorConfig.from_dict(
        {
            "size": {"shortest_edge": size},
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "image_mean": list(loaded.family.default_mean),
            "image_std": list(loaded.family.default_std),
        }
    )


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
