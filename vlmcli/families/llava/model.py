"""LLaVA assembled from the shared blocks: vision tower -> projector -> visual tokens
scattered over the <image> slots -> decoder (vlmcli/model/multimodal.py does all of it).

LLaVA-NeXT and LLaVA-OneVision ("anyres") run the tower on a base view and the tiles of
each image, then pack each image's features into one sequence (see vlmcli/anyres.py): the
base view's tokens, then the tiles' feature map row by row, each row closed by the learned
`image_newline`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli import anyres
from vlmcli.config import MultiModalConfig
from vlmcli.model.multimodal import VisionLanguageModel, VisualTokens


class LlavaModel(VisionLanguageModel):
    def __init__(self, cfg: MultiModalConfig):
        super().__init__(cfg)
        # The checkpoint's top-level `image_newline` (anyres families only).
        self.image_newline = nn.Parameter(torch.empty(cfg.text.d_model)) if cfg.anyres is not None else None

    def encode_images(
        self,
        pixels: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        views_per_image: Sequence[int] | None = None,
    ) -> VisualTokens:
        """Plain LLaVA: pixels (N, 3, H, W), one view per image -> (N, n_visual, d_language).
        Anyres: pixels (total views, 3, H, W) holding each image's base view then its tiles;
        `image_sizes` the (height, width) of each original image and `views_per_image` how
        many views each has -> a list of (n_i, d_language), one per image."""
        tokens = self.projector(self.vision_features(pixels))
        if self.cfg.anyres is None:
            return tokens
        if image_sizes is None or views_per_image is None:
            raise ValueError("anyres models need the image sizes and views per image")
        if sum(views_per_image) != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} views for images of {list(views_per_image)} views")
        per_image = torch.split(tokens, list(views_per_image), dim=0)
        return [self._pack(t, size) for t, size in zip(per_image, image_sizes)]

    def _pack(self, views: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's views (1 + tiles, P, d) -> its token sequence (n, d), as transformers'
        pack_image_features does."""
        a = self.cfg.anyres
        newline = self.image_newline
        base = views[0]
        if views.shape[0] == 1:  # base view only: its tokens, then one newline
            return torch.cat([base, newline[None].to(base.dtype)], dim=0)
        side = a.patches_per_side
        rows, cols = anyres.tile_grid(size, a.grid_pinpoints, a.tile)
        if views.shape[0] - 1 != rows * cols:
            raise ValueError(f"image of {size} has {views.shape[0] - 1} tiles, its grid {rows}x{cols}")
        # (tiles, side*side, d) -> one (d, rows*side, cols*side) feature map
        grid = views[1:].view(rows, cols, side, side, -1)
        grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        top, bottom, left, right = anyres.unpadded_rows_cols(size, grid.shape[1], grid.shape[2])
        grid = grid[:, top:bottom, left:right]
        ratio = anyres.shrink_ratio(grid.shape[1], grid.shape[2], side, a.max_tiles)
        if ratio is not None:
            target = [int(grid.shape[1] // ratio), int(grid.shape[2] // ratio)]
            grid = F.interpolate(grid[None], target, mode="bilinear")[0]
        column = newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.dtype)
        grid = torch.cat([grid, column], dim=-1)  # every row ends with image_newline
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)
