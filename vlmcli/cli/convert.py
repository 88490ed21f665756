"""`vlm convert SOURCE OUTPUT --to FORMAT`: write a quantized (or 16-bit) copy of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlmcli.cli import options
from vlmcli.cli.console import progress_bar, state

DEFAULT_MAX_SHARD = "5GB"  # vlmcli.convert.DEFAULT_MAX_SHARD; not imported here, it brings torch


def convert(
    source: Annotated[str, typer.Argument(help="A model folder, a hub repo id (id@revision), or 'demo'.", show_default=False)],
    output: Annotated[Path, typer.Argument(help="The folder to write; it must not exist (see --force).", show_default=False)],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="int8|nf4|fp4|fp16|bf16",
            help="int8 (LLM.int8), nf4 or fp4 (4-bit): bitsandbytes as transformers saves it; fp16 or bf16: plain 16-bit.",
            show_default=False,
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it is an existing model folder.")] = False,
    double_quant: Annotated[
        bool, typer.Option("--double-quant", help="nf4/fp4: quantize the per-block scales too (~0.4 bit less per weight).")
    ] = False,
    threshold: Annotated[
        float, typer.Option("--threshold", min=0.0, help="int8: LLM.int8 outlier threshold recorded in the config.")
    ] = 6.0,
    quantize_all: Annotated[
        bool, typer.Option("--quantize-all", help="Also quantize the vision tower, projector and lm_head.")
    ] = False,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Split the weights into files of at most this size.")
    ] = DEFAULT_MAX_SHARD,
    quiet: options.Quiet = False,
) -> None:
    """Convert a model to int8, nf4, fp4 (bitsandbytes) or fp16 / bf16."""
    from vlmcli import convert as library
    from vlmcli.checkpoint import parse_size
    from vlmcli.info import human_bytes

    state.quiet = quiet
    opts = library.ConvertOptions(
        to=to.lower(),
        double_quant=double_quant,
        threshold=threshold,
        quantize_all=quantize_all,
        max_shard_bytes=parse_size(max_shard_size),
        force=force,
    )
    with progress_bar("converting") as update:
        result = library.convert(source, output, opts, progress=update, download_progress=not quiet)
    weights = [f for f in result.files if f.endswith(".safetensors")]
    print(
        f"wrote {result.output} ({opts.to}): {result.quantized_layers} layers quantized, "
        f"{result.unquantized_layers} kept, {human_bytes(result.bytes_written)} in {len(weights)} "
        f"file{'s' if len(weights) != 1 else ''}"
    )
