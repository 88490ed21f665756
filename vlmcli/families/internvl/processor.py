"""InternVL's processor: dynamic tiling as transformers' GotOcr2ImageProcessor does it with
crop_to_patches (which InternVLProcessor always turns on), and the prompt as
InternVLProcessor writes it.

Tiling (GotOcr2ImageProcessor.crop_image_to_patches):
    the grid (columns x rows) with min_patches <= tiles <= max_patches whose aspect ratio is
    closest to the image's (ties: the later, larger grid while the image covers more than
    half its area), the whole image resized (bicubic, on the uint8 image) to that grid of
    448 px tiles and cut row by row; a thumbnail (the whole image at 448 px) follows when
    there are several tiles. max_patches 1 means one plain resize.
    Each view is then rescaled and normalised (ImageNet statistics on the hub repos).
Prompt: the chat template writes <IMG_CONTEXT> once per image; it becomes
    <img> + <IMG_CONTEXT> x (256 per view) + </img>.

`max_patches` (the most tiles per image, thumbnail not counted) comes from the checkpoint's
image settings (12 on the hub repos) unless the caller gives one (`max_tiles`).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmcli.errors import CheckpointError, ContextLengthError, UsageError, VlmError
from vlmcli.families.internvl.config import DEFAULT_MAX_TILES, DEFAULT_MIN_TILES, InternVLConfig
from vlmcli.preprocess import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, ImageProcessorConfig, _to_rgb, preprocess
from vlmcli.processor import Notice, PreparedImages, image_settings
from vlmcli.sequence import Message, PromptSequence, count_images
from vlmcli.tokenizer import Tokenizer

FAMILY_NAME = "InternVL"

# GotOcr2ImageProcessor's class defaults: what a preprocessor_config.json that leaves a key
# out means (its mean/std are CLIP's; the hub repos write ImageNet's).
_GOT_OCR2_CLASS_DEFAULTS: dict[str, Any] = {
    "size": {"height": 384, "width": 384},
    "resample": BICUBIC,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_patches": DEFAULT_MIN_TILES,
    "max_patches": DEFAULT_MAX_TILES,
}


def image_processor_defaults(cfg: InternVLConfig) -> dict[str, Any]:
    """The image settings of a checkpoint that has none: the hub repos' (GotOcr2 with
    ImageNet statistics, tiles of the vision tower's input size, 1 to 12 tiles)."""
    size = cfg.vision.image_size
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "size": {"height": size, "width": size},
        "resample": BICUBIC,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "crop_to_patches": True,
        "min_patches": cfg.min_tiles,
        "max_patches": cfg.max_tiles,
    }


@lru_cache(maxsize=16)
def _arrangements(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) with min <= columns * rows <= max, by tile count (stable)."""
    grids = [
        (w, h)
        for w in range(1, max_tiles + 1)
        for h in range(1, max_tiles + 1)
        if min_tiles <= w * h <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(size: tuple[int, int], tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) for an image of (height, width), as get_optimal_tiled_canvas."""
    height, width = size
    tile_h, tile_w = tile
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in _arrangements(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * grid[0] * grid[1]:
            best = grid
    return best


def _settings_int(raw: dict[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"image processor {key} must be a positive integer, got {value!r}")
    return value


class InternVLProcessor:
    def __init__(
        self,
        cfg: InternVLConfig,
        folder: Path,
        tokenizer: Tokenizer,
        notice: Notice | None = None,
        *,
        max_tiles: int | None = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        defaults = image_processor_defaults(cfg)
        config, raw = image_settings(folder, defaults, FAMILY_NAME, notice)
        if raw is not defaults:
            # the checkpoint's file: what it leaves out means GotOcr2's class defaults
            raw = {**_GOT_OCR2_CLASS_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
            config = ImageProcessorConfig.from_dict(raw)
        if not isinstance(config.size, tuple):
            raise CheckpointError(
                f"the image processor size {config.size!r} is not a tile size",
                hint="InternVL's GotOcr2 settings give size as {'height': H, 'width': W}",
            )
        self.tile: tuple[int, int] = config.size
        side = cfg.vision.image_size
        if self.tile != (side, side):
            raise CheckpointError(
                f"the image processor's {self.tile[0]}x{self.tile[1]} px tiles are not the vision tower's "
                f"{side} px input",
                hint="the checkpoint is inconsistent; re-download it",
            )
        # each view arrives at the tile size: only rescale and normalise remain
        self.image_config = config
        self._view_config = dataclasses.replace(config, do_resize=False, do_center_crop=False)
        self.min_patches = _settings_int(raw, "min_patches")
        self.max_patches = _settings_int(raw, "max_patches")
        if max_tiles is not None:
            self.set_max_tiles(max_tiles)
        self.start_id, self.end_id = (self._token_id(name, default) for name, default in (
            ("start_image_token", "<img>"), ("end_image_token", "</img>")))

    def set_max_tiles(self, n: int) -> None:
        """The most tiles per image (InternVL's max_num / max_patches); 1 is a single view."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"the maximum tile count must be a positive integer, not {n!r}")
        self.max_patches = n

    def _token_id(self, name: str, default: str) -> int:
        token = self.tokenizer.special_tokens.get(name) or default
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no {token} token, which InternVL prompts need")
        return token_id

    # ---- images

    def views(self, image: Image.Image) -> list[Image.Image]:
        """One image's views (uint8 RGB, tile-sized): the grid's tiles row by row, then the
        thumbnail when there are several; or one resized view."""
        if image.mode != "RGB" or "transparency" in image.info:
            image = _to_rgb(image, [])
        tile_h, tile_w = self.tile
        resample = self.image_config.resample
        if self.max_patches <= 1:  # GotOcr2 does not tile then: a plain resize
            if self.image_config.do_resize:
                image = image.resize((tile_w, tile_h), resample=resample)
            return [image]
        cols, rows = tile_grid((image.height, image.width), self.tile, self.min_patches, self.max_patches)
        resized = image.resize((tile_w * cols, tile_h * rows), resample=resample)
        tiles = [
            resized.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
            for r in range(rows)
            for c in range(cols)
        ]
        if len(tiles) > 1:
            tiles.append(image.resize((tile_w, tile_h), resample=resample))
        return tiles

    def prepare_images(self, images: list[Image.Image]) -> PreparedImages:
        per_image = [[preprocess(v, self._view_config) for v in self.views(img)] for img in images]
        shapes = {tuple(t.shape) for views in per_image for t in views}
        if len(shapes) > 1:
            raise CheckpointError(f"the image settings give views of several sizes ({sorted(shapes)})")
        views = [len(v) for v in per_image]
        pixels = torch.stack([t for v in per_image for t in v])
        per_view = self.cfg.tokens_per_view()
        return PreparedImages(
            pixels,
            [(img.height, img.width) for img in images],
            views,
            [per_view * n for n in views],
        )

    # ---- prompt

    def build_prompt(self, messages: list[Message], token_counts: list[int], context_length: int) -> PromptSequence:
        """The chat template's ids, each <IMG_CONTEXT> widened to <img>, that image's
        count of <IMG_CONTEXT>, </img> (InternVLProcessor's replace_image_token)."""
        n_images = count_images(messages)
        counts = list(token_counts)
        if len(counts) != n_images:
            raise VlmError(f"{len(counts)} image token counts for {n_images} images")
        image_id = self.cfg.image_token_id
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        slots = ids.count(image_id)
        if slots != n_images:
            raise VlmError(
                f"the chat template wrote {slots} image placeholders for {n_images} images; "
                f"the model's template does not place images where vlm expects them"
            )
        out: list[int] = []
        k = 0
        for i in ids:
            if i == image_id:
                out += [self.start_id] + [image_id] * counts[k] + [self.end_id]
                k += 1
            else:
                out.append(i)
        image_tokens = sum(counts)
        if len(out) >= context_length:
            raise ContextLengthError(
                f"the prompt is {len(out)} tokens ({image_tokens} of them for "
                f"{n_images} image(s)) but the model's context is {context_length} tokens"
            )
        return PromptSequence(ids=out, image_tokens=image_tokens, n_images=n_images)
