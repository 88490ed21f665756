"""`vlm describe IMAGE...`: one answer per image, as text or JSON Lines."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Annotated

import typer

from rich.markup import escape

from vlmcli import inputs
from vlmcli.batch.fetch import ahead, read_file
from vlmcli.cli import options
from vlmcli.cli.common import load_pipeline, sampling_options, set_max_image_pixels
from vlmcli.cli.console import err_console, notice, progress_bar, state, write_result
from vlmcli.errors import ImageError, VlmError

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
    mmproj: options.Mmproj = None,
    backend: options.BackendName = "auto",
    max_tokens: options.MaxTokens = 256,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    repetition_penalty: options.RepetitionPenalty = 1.0,
    seed: options.Seed = None,
    max_tiles: options.MaxTiles = None,
    max_pixels: options.MaxPixels = None,
    min_pixels: options.MinPixels = None,
    max_image_pixels: options.MaxImagePixels = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout (JSON Lines).")] = False,
    threads: options.Threads = None,
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
    from vlmcli.preprocess import probe_image, tiny_image_note  # torch: imported when the command runs

    set_max_image_pixels(max_image_pixels)
    # Every path checked, every URL fetched and every header read (missing, not an image, too
    # many pixels) before the model loads; an image that fails is reported and the rest go on.
    # A damaged body is found when that image is decoded, at its turn.
    images, failed = [], 0
    entries = inputs.expand_each(image)
    for entry in entries:
        try:
            if isinstance(entry, inputs.BadInput):
                raise entry.error
            item = entry.fetched()
            images.append((item, tiny_image_note(probe_image(item.source, name=item.name))))
        except ImageError as e:
            if len(entries) == 1:
                raise
            failed += 1
            _report_failure(entry.name, e, json_lines)
    total = len(images) + failed
    if not images:
        raise VlmError(f"{failed} of {total} images failed")
    pipe = load_pipeline(model, backend, max_tiles, min_pixels, max_pixels, mmproj=mmproj, images=True, threads=threads)
    if prompt is None:
        prompt = pipe.family.default_prompt or DEFAULT_PROMPT

    # Text streamed to a terminal is its own progress; a bar is drawn (on stderr) when the
    # results go to a file or a pipe.
    bar_total = len(images) if len(images) > 1 and not sys.stdout.isatty() else None
    blocks = 0  # headed blocks written to stdout
    with progress_bar("describing", total=bar_total) if bar_total else nullcontext() as update:
        # each file read by a background thread while the model describes the one before
        # and decoded (a few at a time: a long list is not held in memory)
        for i, ((item, tiny), read) in enumerate(ahead(images, lambda entry: read_file(entry[0]).decoded())):
            # the header goes out with the first text (or the empty answer), so an image that
            # turns out to be undecodable leaves none behind
            header = [f"==> {item.name} <=="] if total > 1 and not json_lines else []

            def stream(piece: str, header: list[str] = header) -> None:
                nonlocal blocks
                if header:
                    print(("\n" if blocks else "") + header.pop(), flush=True)
                    blocks += 1
                write_result(piece)

            try:
                if isinstance(read, ImageError):
                    raise read
                answer = pipe.describe([read], prompt, opts, on_text=None if json_lines else stream)
            except ImageError as e:
                if total == 1:
                    raise
                failed += 1
                _report_failure(item.name, e, json_lines)
                continue
            finally:
                if update:
                    update(i + 1, len(images))
            if header:
                stream("")
            for note in ([tiny] if tiny else []) + answer.notes:
                notice(f"{item.name}: {note}")
            if not answer.text.strip():
                notice(("" if total == 1 else f"{item.name}: ") + "(the model gave no text)")
            if json_lines:
                from vlmcli.batch.records import describe_record  # imports torch: not at `vlm --help`

                record = describe_record(item.name, answer, model=model, backend=pipe.backend.name, prompt=prompt)
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                print(flush=True)
    if failed:
        raise VlmError(f"{failed} of {total} images failed")


def _report_failure(name: str, error: ImageError, json_lines: bool) -> None:
    """One image that could not be described: a JSON record on stdout with --json (its place
    in the results), else an error line on stderr."""
    if json_lines:
        print(json.dumps({"image": name, "error": str(error), "error_type": error.kind}, ensure_ascii=False), flush=True)
    else:
        err_console().print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
