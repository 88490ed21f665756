"""Steps every model-running command takes: check the sampling options, load the model with
progress on stderr."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmcli.cli.console import notice, progress_bar, show_progress, state
from vlmcli.errors import UsageError

if TYPE_CHECKING:  # torch is imported by a command when it runs, not by `vlm --help`
    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline


def sampling_options(**kwargs) -> SamplingOptions:
    from vlmcli.generate import SamplingOptions

    try:
        return SamplingOptions(**kwargs)
    except ValueError as e:
        raise UsageError(str(e)) from None


def physical_cores() -> int:
    """The physical cores this process may run on (hyperthread siblings counted once): what
    decoding wants, since a matrix-vector product is memory-bound and two threads on one
    core only contend. From /sys's topology; the logical count where that is missing."""
    import os
    from pathlib import Path

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


def set_threads(threads: int | None = None) -> int:
    """Set the CPU threads once, for torch's intra-op pool and OpenMP (MKL, oneDNN follow
    it): `threads`, else $VLM_THREADS, else the physical cores. OMP_NUM_THREADS is set too,
    so processes this one starts (`vlm bench` runs one per backend) get the same."""
    import os

    import torch

    if threads is None:
        env = os.environ.get("VLM_THREADS", "").strip()
        try:
            threads = int(env) if env else physical_cores()
        except ValueError:
            raise UsageError(f"VLM_THREADS must be a whole number, not '{env}'") from None
    if threads < 1:
        raise UsageError(f"--threads must be 1 or more, not {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def load_pipeline(
    model: str,
    backend: str,
    max_tiles: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    *,
    mmproj: str | None = None,
    images: bool = False,
    threads: int | None = None,
) -> Pipeline:
    """The model, with huggingface_hub's download bars and our loading bar on a terminal
    (nothing under -q or when stderr is not a terminal), and the image settings given on
    the command line (--max-tiles, --min-pixels / --max-pixels: refused where the family
    does not cut or resize images that way). mmproj: a GGUF model's vision file; images:
    the command has images for the model, so a GGUF model without its mmproj fails now.
    threads: --threads (see set_threads)."""
    from vlmcli.pipeline import Pipeline

    set_threads(threads)

    if images:
        from vlmcli.gguf.source import require_vision

        require_vision(model, mmproj)

    state.phase = "loading the model"
    with progress_bar("loading model") as update:
        pipe = Pipeline.load(
            model, backend, progress=update, notice=notice, download_progress=show_progress(), mmproj=mmproj
        )
    if max_tiles is not None:
        pipe.set_max_tiles(max_tiles)
    if min_pixels is not None or max_pixels is not None:
        pipe.set_pixels(min_pixels, max_pixels)
    state.phase = "generating"
    return pipe


_saved_pixel_limits: list = []


def set_max_image_pixels(limit: int | None) -> None:
    """--max-image-pixels: Pillow's decompression-bomb limit, which every image load in this
    process reads (vlmcli.preprocess keeps it when given no max_pixels), until main() puts
    the previous one back (`restore_max_image_pixels`)."""
    if limit is None:
        return
    from PIL import Image

    _saved_pixel_limits.append(Image.MAX_IMAGE_PIXELS)
    Image.MAX_IMAGE_PIXELS = limit


def restore_max_image_pixels() -> None:
    if _saved_pixel_limits:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = _saved_pixel_limits[0]
        _saved_pixel_limits.clear()


def model_from(ctx, positional: str | None, option: str | None, positional_name: str) -> str | None:
    """The model a command was given, as a positional argument (`vlm info MODEL`) or with -m
    (`vlm info -m MODEL`); both on the command line is a usage error. VLM_MODEL (which fills
    -m) yields to the positional one."""
    if positional is None:
        return option
    if option is not None and ctx.get_parameter_source("model").name == "COMMANDLINE":
        raise UsageError(f"the model is given twice, as {positional_name} ('{positional}') and with -m ('{option}'); give one")
    return positional
