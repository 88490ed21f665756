"""Options shared by several commands, declared once (Annotated aliases)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

DEFAULT_MODEL = "llava-hf/llava-interleave-qwen-0.5b-hf"

Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="VLM_MODEL",
        metavar="MODEL",
        # the default in the sentence, not in a "[default: ...]" cell: at 80 columns that
        # cell is one character too narrow for the id and Rich would cut it
        help=f"A local model folder, a GGUF file (see --mmproj), a hub repo id (id@revision), or 'demo'. Default: {DEFAULT_MODEL}",
        show_default=False,
        show_envvar=True,
    ),
]
BACKEND_HELP = (
    "Where and how to run: auto, cpu, cpu-bf16, cuda (fp16), bf16, int8, int4 (nf4), "
    "q8, q4 (fast int8 / int4 weights on the CPU); options after a colon, e.g. int4:fp4,dq, "
    "int8:threshold=4, q4:group=64,lm_head. auto: a quantized model in its own format, else "
    "cuda when there is a GPU, else cpu."
)
BackendName = Annotated[
    str,
    typer.Option("--backend", "-b", envvar="VLM_BACKEND", metavar="NAME", help=BACKEND_HELP, show_envvar=True),
]
Threads = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, envvar="VLM_THREADS", metavar="N", show_envvar=True,
        help="CPU threads for torch and OpenMP (default: the physical cores).",
    ),
]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=1, metavar="N", help="Most tokens to generate.")]
Temperature = Annotated[
    float, typer.Option("--temperature", "-t", min=0.0, metavar="T", help="Sampling temperature; 0 is greedy and deterministic.")
]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, metavar="P", help="Nucleus sampling: keep tokens up to this probability mass.")]
TopK = Annotated[int, typer.Option("--top-k", min=0, metavar="K", help="Keep only the K most likely tokens (0: off).")]
RepetitionPenalty = Annotated[
    float, typer.Option("--repetition-penalty", min=0.01, metavar="R", help="Penalise tokens already present (1: off).")
]
Seed = Annotated[Optional[int], typer.Option("--seed", metavar="S", help="Random seed for sampling.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notices on stderr.")]
MaxTiles = Annotated[
    Optional[int],
    typer.Option(
        "--max-tiles",
        min=1,
        metavar="N",
        help="Most tiles an image is cut into, for models that tile by count (InternVL: 1-12 "
        "plus a thumbnail by default). Fewer tiles: fewer image tokens, faster answers.",
    ),
]
MaxPixels = Annotated[
    Optional[int],
    typer.Option(
        "--max-pixels",
        min=1,
        metavar="N",
        help="Most pixels an image is resized to, for models that take images at a pixel "
        "budget (Qwen2-VL, Qwen2.5-VL: 28x28 px a token). Fewer pixels: fewer image tokens.",
    ),
]
MinPixels = Annotated[
    Optional[int],
    typer.Option(
        "--min-pixels",
        min=1,
        metavar="N",
        help="Fewest pixels an image is resized to (Qwen2-VL, Qwen2.5-VL); small images are scaled up to it.",
    ),
]
Mmproj = Annotated[
    Optional[str],
    typer.Option(
        "--mmproj",
        metavar="FILE",
        envvar="VLM_MMPROJ",
        show_envvar=True,
        help="The vision projector GGUF that goes with a GGUF model (llama.cpp's --mmproj).",
        show_default=False,
    ),
]
MaxImagePixels = Annotated[
    Optional[int],
    typer.Option(
        "--max-image-pixels",
        min=1,
        metavar="N",
        envvar="VLM_MAX_IMAGE_PIXELS",
        show_envvar=True,
        help="Refuse images of more pixels than this, a guard against decompression bombs "
        "(default: Pillow's, 89478485).",
    ),
]
