"""Qwen-VL assembled: ViT-bigG -> resampler (256 queries) -> ln_post @ proj -> visual tokens
over the 256 <imgpad> slots of each <img>...</img> span -> the QWen decoder.

The QWen decoder (decoder.py) is vlm's shared Decoder in its Qwen2 form with q/k/v fused into
one layer, as c_attn stores them, plus dynamic NTK and logn scaling past seq_length. Everything after the visual
tokens (embedding, scatter, cache, prefill / step) is VisionLanguageModel's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vlmcli.families.qwen_vl.config import QwenVLConfig
from vlmcli.families.qwen_vl.decoder import QwenDecoder
from vlmcli.families.qwen_vl.vision import QwenVisionTower, QwenVLProjector
from vlmcli.model.multimodal import VisionLanguageModel, VisualTokens


class QwenVLModel(VisionLanguageModel):
    cfg: QwenVLConfig

    def __init__(self, cfg: QwenVLConfig, full: bool = False):
        nn.Module.__init__(self)  # the shared CLIP tower and projector are not Qwen-VL's
        self.cfg = cfg
        self.vision = QwenVisionTower(cfg.vision)
        self.projector = QwenVLProjector(cfg.vision)
        self.decoder = QwenDecoder(cfg.text, cfg.seq_length, cfg.use_dynamic_ntk, cfg.use_logn_attn)

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixels)

    def encode_images(
        self,
        pixels: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        views_per_image: Sequence[int] | None = None,
    ) -> VisualTokens:
        return self.projector(self.vision(pixels))  # (N, 256, d_model), one view per image
