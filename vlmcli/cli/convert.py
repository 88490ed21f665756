"""`vlm convert SOURCE OUTPUT --to FORMAT` (or `-m SOURCE OUTPUT`): write a quantized (or
16-bit) copy of a model, loaded and run once before it is moved into place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlmcli.cli import options
from vlmcli.cli.common import model_from
from vlmcli.cli.console import notice, progress_bar, state
from vlmcli.errors import UsageError

DEFAULT_MAX_SHARD = "5GB"  # vlmcli.convert.DEFAULT_MAX_SHARD; not imported here, it brings torch


def convert(
    ctx: typer.Context,
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="[SOURCE] OUTPUT",
            help="SOURCE: the model to convert (or -m). OUTPUT: the folder to write; it must not exist (see --force).",
            show_default=False,
        ),
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="FORMAT",
            help="int8 (LLM.int8), nf4 or fp4 (4-bit): bitsandbytes as transformers saves it; q8 or q4: "
            "vlm's weight-only int8 / int4 for the fast CPU backends (-b q8 / -b q4); fp16 or bf16: plain 16-bit.",
            show_default=False,
        ),
    ],
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            "-m",
            envvar="VLM_MODEL",
            show_envvar=True,
            metavar="MODEL",
            help="The model to convert, instead of SOURCE: a local model folder, a GGUF file (see --mmproj), a hub repo id (id@revision), or 'demo'.",
        ),
    ] = None,
    mmproj: options.Mmproj = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it is an existing model folder.")] = False,
    double_quant: Annotated[
        bool, typer.Option("--double-quant", help="nf4/fp4: quantize the per-block scales too (~0.4 bit less per weight).")
    ] = False,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, metavar="T", help="int8: LLM.int8 outlier threshold recorded in the config.")
    ] = 6.0,
    quantize_all: Annotated[
        bool, typer.Option("--quantize-all", help="Also quantize the vision tower, projector and lm_head.")
    ] = False,
    quantize_head: Annotated[
        bool,
        typer.Option("--quantize-head", help="q8/q4: also quantize lm_head (a small model's largest layer), as -b q8:lm_head does."),
    ] = False,
    group: Annotated[
        Optional[int],
        typer.Option("--group", metavar="N", help="q4: weights per scale and offset, 32 (default), 64, 128 or 256."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", metavar="SIZE", help="Split the weights into files of at most this size.")
    ] = DEFAULT_MAX_SHARD,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Do not load the result and run it once before moving it into place (a check that needs "
            "the memory describe would).",
        ),
    ] = False,
    quiet: options.Quiet = False,
) -> None:
    """Convert a model to int8, nf4, fp4 (bitsandbytes), q8, q4 (weight-only, for the CPU) or fp16 / bf16."""
    from vlmcli import convert as library
    from vlmcli.checkpoint import parse_size
    from vlmcli.info import human_bytes

    state.quiet = quiet
    if len(paths) > 2:
        raise UsageError(f"convert takes SOURCE and OUTPUT, or -m MODEL and OUTPUT; got {len(paths)} paths")
    source = model_from(ctx, paths[0] if len(paths) == 2 else None, model, "SOURCE")
    if source is None:
        raise UsageError("no model to convert: give SOURCE OUTPUT, or -m MODEL OUTPUT")
    output = Path(paths[-1])
    opts = library.ConvertOptions(
        to=to.lower(),
        double_quant=double_quant,
        threshold=threshold,
        quantize_all=quantize_all,
        quantize_head=quantize_head,
        group=group,
        max_shard_bytes=parse_size(max_shard_size),
        force=force,
        verify=not no_verify,
    )
    with progress_bar("converting") as update:
        result = library.convert(source, output, opts, progress=update, download_progress=not quiet, mmproj=mmproj)
    if result.verified_with:
        notice(f"verified: {output} loads with -b {result.verified_with} and runs")
    weights = [f for f in result.files if f.endswith(".safetensors")]
    fmt = f"{opts.to}, groups of {result.group}" if result.group else opts.to
    print(
        f"wrote {result.output} ({fmt}): {result.quantized_layers} layers quantized, "
        f"{result.unquantized_layers} kept, {human_bytes(result.bytes_written)} in {len(weights)} "
        f"file{'s' if len(weights) != 1 else ''}"
    )
