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


def load_pipeline(model: str, backend: str, max_tiles: int | None = None) -> Pipeline:
    """The model, with huggingface_hub's download bars and our loading bar on a terminal
    (nothing under -q or when stderr is not a terminal)."""
    from vlmcli.pipeline import Pipeline

    state.phase = "loading the model"
    with progress_bar("loading model") as update:
        pipe = Pipeline.load(model, backend, progress=update, notice=notice, download_progress=show_progress())
    if max_tiles is not None:
        pipe.set_max_tiles(max_tiles)
    state.phase = "generating"
    return pipe
