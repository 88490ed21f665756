"""Qwen-VL assembled: ViT-bigG -> resampler (256 queries) -> ln_post @ proj -> visual tokens
over the 256 <imgpad> slots of each <img>...</img> span -> the QWen decoder.

The QWen decoder is vlm's shared Decoder in its Qwen2 form with q/k/v fused into one layer,
as c_attn stores them (q, k, v side by side with their biases). Everything after the visual
tokens (embedding, scatter, cache, prefill / step) is VisionLanguageModel's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vlmcli.families.qwen_vl.config import QwenVLConfig
from vlmcli.families.qwen_vl.vision import QwenVisionTower, QwenVLProjector
from vlmcli.model.decoder import Decoder
from vlmcli.model.multimodal import VisionLanguageModel, VisualTokens


def fused_decoder(cfg: QwenVLConfig) -> Decoder:
    decoder = Decoder(cfg.text)
    t = cfg.text
    for layer in decoder.layers:
        width = (t.n_heads + 2 * t.n_kv_heads) * t.head_dim
        layer.self_attn.fuse_qkv(nn.Linear(t.d_model, width, bias=True))
    return decoder


class QwenVLModel(VisionLanguageModel):
    cfg: QwenVLConfig

    def __init__(self, cfg: QwenVLConfig, full: bool = False):
        nn.Module.__init__(self)  # the shared CLIP tower and projector are not Qwen-VL's
        self.cfg = cfg
        self.vision = QwenVisionTower(cfg.vision)
        self.projector = QwenVLProjector(cfg.vision)
        self.decoder = fused_decoder(cfg)

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixels)

    def encode_images(
        self,
        pixels: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        views_per_image: Sequence[int] | None = None,
    ) -> VisualTokens:
        return self.projector(self.vision(pixels))  # (N, 256, d_model), one view per image
