"""Llama 3.2 Vision's processor: images cut into up to max_image_tiles square tiles, and a
prompt with one <|image|> per image (the chat template writes it; nothing is expanded).

Images, as MllamaImageProcessor (its Pillow backend) computes them:
  1. the canvas: among the tile grids (rows, cols) with rows * cols <= max_image_tiles, the
     one needing the least upscaling (else the least downscaling) to fit the image, the
     smaller area on a tie;
  2. resize (bilinear) to fit that canvas with the aspect ratio kept, each side at least
     one tile where the canvas allows;
  3. pad right and bottom with black to the canvas, rescale, normalise (so the padding is
     -mean/std, not 0), cut into tiles row by row;
  4. stack into max_image_tiles slots, the unused ones all zeros.
Each image's grid travels as PreparedImages.grids (1, rows, cols): the model reads its
aspect-ratio id and its real tiles from it.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmcli.config import MultiModalConfig
from vlmcli.errors import CheckpointError
from vlmcli.preprocess import CLIP_MEAN, CLIP_STD, preprocess
from vlmcli.processor import Notice, PreparedImages, image_settings
from vlmcli.sequence import Message, PromptSequence, build_sequence
from vlmcli.tokenizer import Tokenizer

FAMILY_NAME = "Llama 3.2 Vision"
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, MllamaImageProcessor's


def image_processor_defaults(cfg: MultiModalConfig) -> dict[str, Any]:
    size = cfg.vision.image_size
    return {
        "size": {"height": size, "width": size},
        "resample": BILINEAR,
        "do_center_crop": False,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "max_image_tiles": cfg.vision.max_num_tiles,
    }


@lru_cache(maxsize=8)
def supported_grids(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) with rows * cols <= max_tiles, rows first (the aspect-ratio ids
    count from 1 in this order: get_all_supported_aspect_ratios)."""
    return tuple((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles)


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(rows, cols) of the canvas for an image (get_optimal_tiled_canvas)."""
    grids = supported_grids(max_tiles)
    # the scale that fits the image in each canvas: the smaller of the two sides' scales
    scales = [min(r * tile / height, c * tile / width) for r, c in grids]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [g for g, s in zip(grids, scales) if s == chosen]
    return min(candidates, key=lambda g: g[0] * g[1])  # the first of the smallest area


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(height, width) after resizing into the canvas (get_image_size_fit_to_canvas)."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


class MllamaProcessor:
    def __init__(self, cfg: MultiModalConfig, folder: Path, tokenizer: Tokenizer, notice: Notice | None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_config, raw = image_settings(folder, image_processor_defaults(cfg), FAMILY_NAME, notice)
        size = self.image_config.size
        if not isinstance(size, tuple) or size[0] != size[1] or size[0] != cfg.vision.image_size:
            raise CheckpointError(
                f"the image processor's size {size} is not the vision tower's {cfg.vision.image_size} px square tiles"
            )
        self.tile = size[0]
        self.max_tiles = int(raw.get("max_image_tiles", cfg.vision.max_num_tiles))
        if self.max_tiles != cfg.vision.max_num_tiles or supported_grids(self.max_tiles) != tuple(
            cfg.vision.supported_aspect_ratios
        ):
            raise CheckpointError(
                f"the image processor's max_image_tiles {self.max_tiles} does not give the vision tower's "
                f"supported_aspect_ratios {[list(a) for a in cfg.vision.supported_aspect_ratios]}",
                hint="the checkpoint is inconsistent; re-download it",
            )
        if tokenizer.id_to_token(cfg.image_token_id) is None:
            raise CheckpointError(f"the tokenizer has no token for image_token_index {cfg.image_token_id}")

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> its tiles (rows * cols, 3, S, S) and its grid (rows, cols)."""
        ic, S = self.image_config, self.tile
        rows, cols = best_canvas(image.height, image.width, self.max_tiles, S)
        h, w = fit_to_canvas(image.height, image.width, rows * S, cols * S, S)
        # resized only: the padding is added to the 0..255 values, as the reference pads
        # before it rescales and normalises
        resize_only = dataclasses.replace(ic, size=(h, w), do_center_crop=False, do_rescale=False, do_normalize=False)
        x = preprocess(image, resize_only)
        canvas = torch.zeros(3, rows * S, cols * S, dtype=torch.float32)
        canvas[:, :h, :w] = x
        if ic.do_rescale:
            canvas = (canvas.to(torch.float64) * ic.rescale_factor).to(torch.float32)
        if ic.do_normalize:
            mean = torch.tensor(ic.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(ic.image_std, dtype=torch.float32).view(3, 1, 1)
            canvas = (canvas - mean) / std
        tiles = canvas.view(3, rows, S, cols, S).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, S, S)
        return tiles, (rows, cols)

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        S = self.tile
        pixels = torch.zeros(len(images), self.max_tiles, 3, S, S, dtype=torch.float32)
        grids = []
        for i, image in enumerate(images):
            tiles, (rows, cols) = self.tiles(image)
            pixels[i, : tiles.shape[0]] = tiles
            grids.append((1, rows, cols))
        return PreparedImages(
            pixels,
            [(img.height, img.width) for img in images],
            [r * c for _, r, c in grids],
            [1] * len(images),  # one <|image|> token each
            grids=grids,
        )

    def build_prompt(
        self, messages: list[Message], token_counts: list[int], context_length: int, grids=None
    ) -> PromptSequence:
        """The chat template's rendering; each <|image|> stays one token."""
        return build_sequence(
            self.tokenizer,
            messages,
            image_token_id=self.cfg.image_token_id,
            tokens_per_image=1,
            context_length=context_length,
        )
