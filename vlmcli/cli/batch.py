"""`vlm batch INPUT... -o OUT.jsonl|OUT.parquet`: describe a collection into one file, on this
machine or (--ray) on a Ray cluster. Progress on stderr; the results only in the output."""

from __future__ import annotations

import os

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from vlmcli.cli import options
from vlmcli.cli.common import load_pipeline, sampling_options, set_max_image_pixels
from vlmcli.cli.console import err_console, notice, show_progress, state
from vlmcli.errors import UsageError, VlmError


def batch(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders, globs, http(s) URLs, object-store URIs (s3://, gs://), or manifests: "
            ".txt (a path or URL a line), .jsonl or .parquet (an 'image' field; optional 'id' and 'prompt').",
            show_default=False,
            metavar="INPUT",
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", metavar="OUT",
            help="OUT.jsonl or OUT.parquet (with --ray: a folder of that name, of shards).", show_default=False,
        ),
    ],
    prompt: Annotated[
        Optional[str],
        typer.Option("--prompt", "-p", help="What to ask about each image (a manifest row's own prompt wins).",
                     show_default="Describe this image. / PaliGemma: caption en"),
    ] = None,
    model: options.Model = options.DEFAULT_MODEL,
    backend: options.BackendName = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT: skip the ids already in it.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
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
    on_ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Data (pip install 'vlmcli\\[ray]').")] = False,
    ray_address: Annotated[
        Optional[str],
        typer.Option("--ray-address", envvar="RAY_ADDRESS", show_envvar=True, metavar="ADDRESS",
                     help="The Ray cluster to join (default: start a local Ray on this machine)."),
    ] = None,
    actors: Annotated[int, typer.Option("--actors", min=1, metavar="N", help="--ray: actors, each holding one model.")] = 1,
    cpus_per_actor: Annotated[float, typer.Option("--cpus-per-actor", min=0.0, metavar="C", help="--ray: CPUs each actor takes.")] = 1.0,
    gpus_per_actor: Annotated[float, typer.Option("--gpus-per-actor", min=0.0, metavar="G", help="--ray: GPUs each actor takes.")] = 0.0,
    rows_per_call: Annotated[int, typer.Option("--rows-per-call", min=1, metavar="N", help="--ray: rows an actor describes per call.")] = 16,
    threads: options.Threads = None,
    quiet: options.Quiet = False,
) -> None:
    """Describe many images into a JSONL or Parquet file; a bad image is an error row, and
    --resume continues an interrupted run."""
    state.quiet = quiet
    if threads is not None:  # the processes it starts (Ray's local actors) and this one
        os.environ["VLM_THREADS"] = str(threads)
    sampling = dict(
        max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )
    sampling_options(**sampling)  # checked here, before anything starts
    from vlmcli.batch.describer import JobSettings  # torch: imported when the command runs

    settings = JobSettings(
        model=model, backend=backend, prompt=prompt, sampling=sampling, max_tiles=max_tiles,
        min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=max_image_pixels,
    )
    if resume and force:
        raise UsageError("--resume continues OUT and --force replaces it; give one")
    if on_ray:
        if resume:
            raise UsageError("--resume is not supported with --ray yet: the shards of a killed Ray run are not checked")
        return _on_ray(inputs, output, settings, ray_address, actors, cpus_per_actor, gpus_per_actor, rows_per_call, force, quiet)
    if actors != 1 or cpus_per_actor != 1.0 or gpus_per_actor or rows_per_call != 16:
        raise UsageError("--actors, --cpus-per-actor, --gpus-per-actor and --rows-per-call apply to --ray runs")
    if ray_address and not _from_env_only():
        raise UsageError("--ray-address applies to --ray runs")
    _local(inputs, Path(output), settings, resume, force, max_image_pixels)


def _from_env_only() -> bool:
    """RAY_ADDRESS in the environment (a `ray job submit` job) does not make a local run a mistake."""
    import click

    ctx = click.get_current_context()
    return ctx.get_parameter_source("ray_address").name == "ENVIRONMENT"


def _local(inputs: list[str], output: Path, settings, resume: bool, force: bool, max_image_pixels: int | None) -> None:
    from vlmcli.batch.describer import Describer
    from vlmcli.batch.local import run_local
    from vlmcli.batch.output import open_output, output_format
    from vlmcli.batch.sources import expand_inputs

    output_format(output)
    set_max_image_pixels(max_image_pixels)
    rows = expand_inputs(inputs)  # every manifest read and id checked before the output is touched
    out = open_output(output, resume=resume, force=force)
    for note in out.notes:
        notice(note)

    def describer() -> Describer:
        pipe = load_pipeline(settings.model, settings.backend, settings.max_tiles, settings.min_pixels, settings.max_pixels)
        return Describer(settings, pipe)

    todo = sum(1 for row in rows if row.id not in out.done)
    with _rate_bar(todo) as update:
        summary = run_local(rows, out, describer, progress=update)
    notice(f"{output}: {summary.rows} rows" + (f", {summary.skipped} of them from before" if summary.skipped else ""))
    if summary.failed:
        raise VlmError(f"{summary.failed} of {summary.rows} images failed (their rows in {output} say why)")


def _on_ray(inputs, output, settings, address, actors, cpus, gpus, rows_per_call, force, quiet) -> None:
    from vlmcli.batch.on_ray import RayOptions, import_ray, run_on_ray

    import_ray()
    options_ = RayOptions(address=address, actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus,
                          rows_per_call=rows_per_call, quiet=quiet)
    summary = run_on_ray(inputs, output, settings, options_, force)
    notice(f"{summary.output}: {summary.rows} rows")
    if summary.failed:
        raise VlmError(f"{summary.failed} of {summary.rows} images failed (their rows in {summary.output} say why)")


@contextmanager
def _rate_bar(total: int) -> Iterator:
    """A bar with images/s and the time left, on stderr (a terminal, not -q); yields
    `update(done, total)` or None."""
    if not show_progress() or total < 2:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} img/s" if task.speed else "")

    with Progress(
        TextColumn("describing"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
        console=err_console(), transient=True, redirect_stdout=False, redirect_stderr=False,
    ) as bar:
        task = bar.add_task("describing", total=total)
        yield lambda done, total: bar.update(task, completed=done, total=total)
