"""Qwen2-VL assembled: the vision tower -> the patch merger -> visual tokens over the
<|image_pad|> slots -> the Qwen2 decoder with multimodal RoPE (the prompt's (3, T)
positions come from the processor; see processor.py).

Everything after the visual tokens (embedding, scatter, cache, prefill / step) is
VisionLanguageModel's; the decoder reads (3, T) positions through its mrope_section.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vlmcli.families.qwen2_vl.config import Qwen2VLConfig
from vlmcli.families.qwen2_vl.vision import PatchMerger, Qwen2VisionTower
from vlmcli.model.decoder import Decoder
from vlmcli.model.multimodal import VisionLanguageModel, VisualTokens


class Qwen2VLModel(VisionLanguageModel):
    cfg: Qwen2VLConfig

    def __init__(self, cfg: Qwen2VLConfig, full: bool = False):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.vision = Qwen2VisionTower(cfg.vision)
        self.projector = PatchMerger(cfg.vision)
        self.decoder = Decoder(cfg.text)
        self.decoder.mrope_section = tuple(cfg.mrope_section)

    def encode_grids(self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Every image's patches (as the processor flattens them) -> one (t*h*w/4, d_text)
        tensor per image."""
        tokens = self.projector(self.vision(patches, grids))
        merge = self.cfg.vision.spatial_merge_size**2
        return list(torch.split(tokens, [t * h * w // merge for t, h, w in grids], dim=0))

    def encode(self, prepared) -> VisualTokens:
        if prepared.grids is None:
            raise ValueError("Qwen2-VL images need their patch grids")
        return self.encode_grids(prepared.pixels, prepared.grids)

    def encode_images(self, pixels, image_sizes=None, views_per_image=None) -> VisualTokens:
        raise NotImplementedError("Qwen2-VL encodes patches with their grids (encode / encode_grids)")
