"""What a family's processor gives and takes, and the parts processors share.

    images (Pillow, loaded safely by preprocess.py) -> Processor.prepare_images -> PreparedImages
    messages + each image's token count -> Processor.build_prompt -> PromptSequence

A processor reads its image settings from the checkpoint (`image_settings`): the
`preprocessor_config.json` older transformers writes, else the `image_processor` entry of
the `processor_config.json` current transformers writes, else the family's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from vlmcli import checkpoint
from vlmcli.errors import CheckpointError
from vlmcli.preprocess import ImageProcessorConfig
from vlmcli.sequence import Message, PromptSequence

Notice = Callable[[str], None]  # one line for stderr

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


@dataclass
class PreparedImages:
    """Images ready for the vision tower, with the token count each will become."""

    pixels: torch.Tensor  # (views, 3, H, W): one view per image, or each image's views in turn
    image_sizes: list[tuple[int, int]]  # (height, width) of each image as loaded
    views_per_image: list[int]
    token_counts: list[int]  # visual tokens per image, in order
    notes: list[str] = field(default_factory=list)
    # (t, h, w) patch grid of each image, for families whose prompt positions follow it
    # (Qwen2-VL); None elsewhere
    grids: list[tuple[int, int, int]] | None = None


class Processor(Protocol):
    image_config: ImageProcessorConfig

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        """Preprocess the images of one prompt; nothing runs on the model yet."""
        ...

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int) -> PromptSequence:
        """The decoder's input ids, each image slot sized to its count, checked against the
        context before any forward pass."""
        ...


def image_settings(
    folder: Path, defaults: dict[str, Any], family_name: str, notice: Notice | None
) -> tuple[ImageProcessorConfig, dict[str, Any]]:
    """The checkpoint's image processor settings and the dict they were read from."""
    path = folder / PREPROCESSOR_CONFIG
    if path.exists():
        return ImageProcessorConfig.from_file(path), checkpoint.read_json(path)
    path = folder / PROCESSOR_CONFIG
    if path.exists():
        nested = checkpoint.read_json(path).get("image_processor")
        if nested is not None:
            if not isinstance(nested, dict):
                raise CheckpointError(f"{path.name}: 'image_processor' must be a JSON object", hint="re-download the model")
            try:
                return ImageProcessorConfig.from_dict(nested), nested
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e.message}", hint=e.hint) from None
    if notice:
        notice(f"{folder.name} has no preprocessor_config.json or processor_config.json; using the {family_name} default")
    return ImageProcessorConfig.from_dict(defaults), defaults
