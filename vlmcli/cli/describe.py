"""`vlm describe IMAGE...`: one answer per image, as text or JSON Lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vlmcli.cli import options
from vlmcli.cli.console import notice, progress_bar, state
from vlmcli.errors import ImageError, UsageError
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

DEFAULT_PROMPT = "Describe this image."


def describe(
    image: Annotated[list[Path], typer.Argument(help="Image files to describe.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask about each image.")] = DEFAULT_PROMPT,
    model: options.Model = options.DEFAULT_MODEL,
    backend: options.BackendName = "auto",
    max_tokens: options.MaxTokens = 256,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    seed: options.Seed = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout (JSON Lines).")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Describe each image (or answer PROMPT about it)."""
    state.quiet = quiet
    try:
        opts = SamplingOptions(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    images = image  # the parameter's name is what usage lines show: IMAGE...
    for image in images:  # fail before the model loads, not after
        if not image.is_file():
            raise ImageError(f"cannot read image '{image}': no such file")
    with progress_bar("loading model") as update:
        pipe = Pipeline.load(model, backend, progress=update, notice=notice, download_progress=not quiet)

    for i, image in enumerate(images):
        stream = None
        if not json_lines:
            if len(images) > 1:
                print(("\n" if i else "") + f"==> {image} <==", flush=True)
            stream = _write_stdout
        answer = pipe.describe([image], prompt, opts, on_text=stream)
        for note in answer.notes:
            notice(f"{image}: {note}")
        if json_lines:
            record = {
                "image": str(image),
                "model": model,
                "backend": pipe.backend.name,
                "prompt": prompt,
                "text": answer.text,
                "tokens": answer.tokens,
                "prompt_tokens": answer.prompt_tokens,
                "image_tokens": answer.image_tokens,
                "finish_reason": answer.finish_reason,
                "timings": answer.timings.as_dict(),
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            print(flush=True)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
