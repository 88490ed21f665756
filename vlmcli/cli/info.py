"""`vlm info [-m] MODEL`: architecture, parameter counts, image tokens and memory per backend."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlmcli.cli import options
from vlmcli.cli.common import model_from
from vlmcli.cli.console import state


def info(
    ctx: typer.Context,
    model_arg: Annotated[
        Optional[str],
        typer.Argument(metavar="MODEL", help="The model, as -m names it (either form; not both).", show_default=False),
    ] = None,
    model: options.Model = options.DEFAULT_MODEL,
    mmproj: options.Mmproj = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Describe a model and estimate its memory on each backend (no weights are loaded)."""
    from vlmcli.info import human_bytes, human_count, model_info  # torch: imported when the command runs

    state.quiet = quiet
    model = model_from(ctx, model_arg, model, "MODEL")
    data = model_info(model, download_progress=not quiet, mmproj=mmproj)
    if json_out:
        print(json.dumps(data, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    v, p, d, n = data["vision"], data["projector"], data["decoder"], data["parameters"]
    ckpt = data["checkpoint"]
    out.print(f"[bold]{data['model']}[/]  {data['family']} ({data['model_type']})")
    if v is not None:
        out.print(
            f"  vision     {v['type']}: {v['image_size']} px, patch {v['patch_size']}, width {v['width']}, "
            f"{v['layers_used']} of {v['layers']} layers used, features from layer(s) "
            f"{', '.join(map(str, v['feature_layers']))} ({v['select_strategy']})  {human_count(n['vision'])} params"
        )
        # a resampler (Qwen-VL) has no activation to name: its queries attend over the features
        kind = "cross-attention resampler" if p["type"] == "cross_attention" else f"{p['type']} ({p['activation']})"
        out.print(f"  projector  {kind}, {p['in']} -> {p['out']}  {human_count(n['projector'])} params")
    tied = ", tied embeddings" if d["tied_embeddings"] else ""
    out.print(
        f"  decoder    {d['type']}: {d['layers']} layers, width {d['width']}, {d['heads']} heads / "
        f"{d['kv_heads']} KV heads, MLP {d['mlp']}, vocab {d['vocab']}, context {d['context']}{tied}  "
        f"{human_count(n['decoder'])} params"
    )
    out.print(f"  total      {human_count(n['total'])} parameters; {data['image_tokens']} tokens per image")
    out.print(
        f"  checkpoint {ckpt['format']}, {human_bytes(ckpt['bytes'])} in {ckpt['files']} file"
        f"{'s' if ckpt['files'] != 1 else ''}"
    )
    for part, types in ckpt.get("gguf_types", {}).items():  # a GGUF pair: how each part is stored
        out.print(f"    {part:<10} " + ", ".join(f"{n} {t}" for t, n in types.items()) + " tensors")
        groups = ckpt["gguf_groups"][part]
        out.print("               " + ", ".join(
            f"{g} " + "/".join(t if n == 1 else f"{t} x{n}" for t, n in kinds.items()) for g, kinds in groups.items()
        ))
    table = Table(title="estimated memory: weights, and KV cache per 1,000 tokens", title_justify="left")
    for column, justify in (("backend", "left"), ("runs as", "left"), ("weights", "right"), ("KV cache", "right"), ("here", "left")):
        table.add_column(column, justify=justify)
    reasons: dict[str, list[str]] = {}
    for row in data["backends"]:
        if not row["available"]:
            reasons.setdefault(row["reason"], []).append(row["backend"])
        if "weights_bytes" not in row:
            table.add_row(row["backend"], "-", "-", "-", "no")
            continue
        table.add_row(
            row["backend"],
            row["description"],
            human_bytes(row["weights_bytes"]),
            human_bytes(row["kv_cache_bytes_per_1k_tokens"]),
            "yes" if row["available"] else "no",
        )
    out.print(table)
    for reason, names in reasons.items():
        out.print(f"  {', '.join(names)}: {reason}")
