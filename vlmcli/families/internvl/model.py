"""InternVL assembled: InternViT -> pixel shuffle -> LayerNorm + MLP projector -> visual
tokens scattered over the <IMG_CONTEXT> slots -> the (Qwen2) decoder.

    tiles (V, 3, 448, 448) -> InternViT hidden state (V, 1 + 32*32, 1024)
      -> drop [CLS], fold to (V, 32, 32, 1024) -> pixel shuffle (V, 16, 16, 4096)
      -> projector: LayerNorm(4096), linear_1 -> GELU -> linear_2      (V, 256, d_language)
      -> each image's tiles (and thumbnail) in turn: one (views * 256, d_language) block

Everything after the visual tokens (embedding, scatter, decoder, cache, prefill / step) is
VisionLanguageModel's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vlmcli.families.internvl.config import InternVLConfig
from vlmcli.families.internvl.vision import InternVisionModel
from vlmcli.model.activations import activation
from vlmcli.model.decoder import Decoder
from vlmcli.model.multimodal import VisionLanguageModel, VisualTokens


class InternVLProjector(nn.Module):
    """transformers' InternVLMultiModalProjector (names: layer_norm, linear_1, linear_2)."""

    def __init__(self, cfg: InternVLConfig):
        super().__init__()
        p = cfg.projection
        self.cfg = p
        self.layer_norm = nn.LayerNorm(p.d_vision)  # eps 1e-5, the nn default transformers keeps
        self.linear_1 = nn.Linear(p.d_vision, p.d_language)
        self.act = activation(p.activation)
        self.linear_2 = nn.Linear(p.d_language, p.d_language)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(features))))


def pixel_shuffle(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, W, H, C) -> (B, W*r, H*r, C/r^2), as transformers' InternVLModel.pixel_shuffle
    (the same views and permutes, so the same channel order)."""
    B, W, H, C = features.shape
    x = features.view(B, W, int(H * ratio), int(C / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(B, int(H * ratio), int(W * ratio), int(C / (ratio**2)))
    return x.permute(0, 2, 1, 3).contiguous()


class InternVLModel(VisionLanguageModel):
    cfg: InternVLConfig

    def __init__(self, cfg: InternVLConfig, full: bool = False):
        # VisionLanguageModel.__init__ builds the shared CLIP/SigLIP tower and projector;
        # InternVL has its own, so the three stages are set up here instead.
        nn.Module.__init__(self)
        self.cfg = cfg
        n_layers = cfg.vision.n_layers if full else cfg.vision_layers_needed()
        self.vision = InternVisionModel(cfg.vision, n_layers)
        self.projector = InternVLProjector(cfg)
        self.decoder = Decoder(cfg.text)

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(V, 3, H, W) tiles -> (V, tokens_per_view, d_vision * k^2), before projection."""
        features = self.vision(pixels, self.cfg.feature_layer)[:, 1:]  # "default": drop [CLS]
        V, n, d = features.shape
        side = int(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} patch features do not form a square")
        shuffled = pixel_shuffle(features.reshape(V, side, side, d), self.cfg.downsample_ratio)
        return shuffled.reshape(V, -1, shuffled.shape[-1])

    def encode_images(
        self,
        pixels: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        views_per_image: Sequence[int] | None = None,
    ) -> VisualTokens:
        """Tiles of every image, image after image -> one (views_i * tokens_per_view, d_language)
        tensor per image (each tile an image of its own when views_per_image is not given)."""
        tokens = self.projector(self.vision_features(pixels))  # (V, n, d)
        views = list(views_per_image) if views_per_image is not None else [1] * tokens.shape[0]
        if sum(views) != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} tiles for images of {views} views")
        return [t.reshape(-1, t.shape[-1]) for t in torch.split(tokens, views, dim=0)]
