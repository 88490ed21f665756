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


def load_pipeline(
    model: str,
    backend: str,
    max_tiles: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    *,
    mmproj: str | None = None,
    images: bool = False,
) -> Pipeline:
    """The model, with huggingface_hub's download bars and our loading bar on a terminal
    (nothing under -q or when stderr is not a terminal), and the image settings given on
    the command line (--max-tiles, --min-pixels / --max-pixels: refused where the family
    does not cut or resize images that way). mmproj: a GGUF model's vision file; images:
    the command has images for the model, so a GGUF model without its mmproj fails now."""
    from vlmcli.pipeline import Pipeline

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
