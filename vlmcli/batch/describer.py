"""One model, loaded once, describing rows one at a time: what the local run and each Ray
actor hold.

A row is described exactly as `vlm describe IMAGE` describes that image alone (the same
`Pipeline.describe` call, prompt and sampling options), so a batch's answers equal
single-image runs. A row that fails becomes an error record and the job goes on; only
running out of memory (the next row would too) or an interrupt ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmcli.batch import records
from vlmcli.batch.fetch import fetch
from vlmcli.batch.sources import Row
from vlmcli.errors import ContextLengthError, ImageError, VlmError
from vlmcli.inputs import ImageInput

DEFAULT_PROMPT = "Describe this image."  # as `vlm describe`


@dataclass(frozen=True)
class JobSettings:
    """Everything a describer needs to load its model and answer a row; plain values, so a
    Ray actor can be built from it on another machine."""

    model: str
    backend: str = "auto"
    prompt: str | None = None  # None: the family's default prompt, else DEFAULT_PROMPT
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingOptions' fields
    max_tiles: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_image_pixels: int | None = None


class Describer:
    def __init__(self, settings: JobSettings, pipe=None):
        """`pipe`: a model already loaded with these settings (the CLI loads it with a
        progress bar); else it is loaded here."""
        from vlmcli.generate import SamplingOptions

        self.settings = settings
        if settings.max_image_pixels is not None:
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # this process is the job's
        if pipe is None:
            from vlmcli.pipeline import Pipeline

            pipe = Pipeline.load(settings.model, settings.backend, download_progress=False)
            if settings.max_tiles is not None:
                pipe.set_max_tiles(settings.max_tiles)
            if settings.min_pixels is not None or settings.max_pixels is not None:
                pipe.set_pixels(settings.min_pixels, settings.max_pixels)
        self.pipe = pipe
        self.opts = SamplingOptions(**settings.sampling)
        self.default_prompt = settings.prompt or pipe.family.default_prompt or DEFAULT_PROMPT

    def describe_row(self, row: Row) -> dict[str, Any]:
        """Read the row's image and describe it (what a Ray actor does per row)."""
        try:
            image = fetch(row)
        except ImageError as e:
            return self.failure(row, e)
        return self.describe_fetched(row, image)

    def describe_fetched(self, row: Row, image: ImageInput | ImageError) -> dict[str, Any]:
        """The record for a row whose bytes were read (or failed to be) ahead."""
        if isinstance(image, ImageError):
            return self.failure(row, image)
        prompt = row.prompt or self.default_prompt
        try:
            answer = self.pipe.describe([image], prompt, self.opts)
        except VlmError as e:  # the image, or this row's prompt (too long for the context)
            return self.failure(row, e)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug met by one row: said in its record; the others go on
            if _out_of_memory(e):
                raise
            return records.error_record(row.id, row.image, f"internal error: {type(e).__name__}: {e}", "internal")
        return records.answer_record(
            row.id, row.image, answer, model=self.settings.model, backend=self.pipe.backend.name, prompt=prompt
        )

    @staticmethod
    def failure(row: Row, error: VlmError) -> dict[str, Any]:
        if isinstance(error, ImageError):
            kind = error.kind
        elif isinstance(error, ContextLengthError):
            kind = "context_length"
        else:
            kind = "failed"
        return records.error_record(row.id, row.image, str(error), kind)


def _out_of_memory(e: Exception) -> bool:
    import torch

    return isinstance(e, getattr(torch, "OutOfMemoryError", MemoryError))
