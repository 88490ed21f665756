"""The geometry of "anyres" (LLaVA-NeXT, LLaVA-OneVision), shared by preprocessing, sequence
construction and the model, so that the three agree on every image.

    image (H, W) -> best grid resolution from the pinpoints -> resized (aspect kept) and
    padded into it -> tiles of the vision tower's input size, plus a base view of the whole
    image -> per tile a side x side feature map -> stitched into one map, the padding cropped
    off again ("unpadding"), optionally shrunk (OneVision's anyres_max_N) -> one row at a time,
    each row ending with the learned image_newline, after the base view's features.

Every formula follows transformers (image_processing_utils.select_best_resolution,
get_patch_output_size, LlavaNext*.unpad_image / pack_image_features) including its integer
and float rounding, because one token more or less shifts every position after the image.
Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

Size = tuple[int, int]  # (height, width)


def select_best_resolution(size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint that keeps the most of the image's pixels, wasting the fewest on padding."""
    height, width = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    if best is None:
        raise ValueError(f"no grid resolution fits an image of {width}x{height}")
    return best


def resized_size(size: Size, target: Size) -> Size:
    """(height, width) of the image scaled to fit inside `target`, aspect ratio kept."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def padding(inner: Size, outer: Size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) that centre `inner` in `outer`; the odd pixel goes last."""
    top, extra_h = divmod(outer[0] - inner[0], 2)
    left, extra_w = divmod(outer[1] - inner[1], 2)
    return top, top + extra_h, left, left + extra_w


def tile_grid(size: Size, pinpoints: Sequence[Size], tile: int) -> Size:
    """(rows, cols) of tiles for an image of `size`."""
    best_h, best_w = select_best_resolution(size, pinpoints)
    return best_h // tile, best_w // tile


def unpadded_rows_cols(size: Size, rows: int, cols: int) -> tuple[int, int, int, int]:
    """Which part of a rows x cols feature map holds the image rather than padding.

    Returns (top, bottom, left, right) as slice bounds, after transformers' unpad_image:
    the padding is computed from the image's aspect ratio, rounded to 7 decimals."""
    height, width = size
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


def shrink_ratio(rows: int, cols: int, side: int, max_tiles: int | None) -> float | None:
    """OneVision's anyres_max_N: the factor the feature map is shrunk by (bilinear), or None
    when it already holds at most ~N tiles' worth (within 10 %)."""
    if max_tiles is None:
        return None
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    return ratio if ratio > 1.1 else None


def feature_grid(
    size: Size, pinpoints: Sequence[Size], tile: int, side: int, max_tiles: int | None = None
) -> Size:
    """(rows, cols) of the stitched, unpadded (and possibly shrunk) feature map of an image,
    `side` features per tile side. Each row gets one image_newline after it."""
    grid_rows, grid_cols = tile_grid(size, pinpoints, tile)
    top, bottom, left, right = unpadded_rows_cols(size, grid_rows * side, grid_cols * side)
    rows, cols = bottom - top, right - left
    ratio = shrink_ratio(rows, cols, side, max_tiles)
    if ratio is not None:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols
