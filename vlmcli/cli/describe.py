"""`vlm describe IMAGE...`: one answer per image, as text or JSON Lines."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Annotated

import typer

from vlmcli import inputs
from vlmcli.cli import options
from vlmcli.cli.common import load_pipeline, sampling_options
from vlmcli.cli.console import notice, progress_bar, state, write_result

DEFAULT_PROMPT = "Describe this image."


def describe(
    image: Annotated[
        list[str],
        typer.Argument(
            help="Image files, globs, folders (their images), '-' for an image on stdin, or http(s) URLs.",
            show_default=False,
            metavar="IMAGE",
        ),
    ],
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            "-p",
            help="What to ask about each image.",
            show_default=f"{DEFAULT_PROMPT} / PaliGemma: caption en",
        ),
    ] = None,
    model: options.Model = options.DEFAULT_MODEL,
    backend: options.BackendName = "auto",
    max_tokens: options.MaxTokens = 256,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    seed: options.Seed = None,
    max_tiles: options.MaxTiles = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout (JSON Lines).")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Describe each image (or answer PROMPT about it)."""
    state.quiet = quiet
    opts = sampling_options(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    # Every path checked and every URL fetched before the model loads, not after
    images = [item.fetched() for item in inputs.expand(image)]
    pipe = load_pipeline(model, backend, max_tiles)
    if prompt is None:
        prompt = pipe.family.default_prompt or DEFAULT_PROMPT

    # Text streamed to a terminal is its own progress; a bar is drawn (on stderr) when the
    # results go to a file or a pipe.
    bar_total = len(images) if len(images) > 1 and not sys.stdout.isatty() else None
    with progress_bar("describing", total=bar_total) if bar_total else nullcontext() as update:
        for i, item in enumerate(images):
            stream = None
            if not json_lines:
                if len(images) > 1:
                    print(("\n" if i else "") + f"==> {item.name} <==", flush=True)
                stream = write_result
            answer = pipe.describe([item], prompt, opts, on_text=stream)
            for note in answer.notes:
                notice(f"{item.name}: {note}")
            if json_lines:
                record = {
                    "image": item.name,
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
            if update:
                update(i + 1, len(images))
