"""The whole vision-language model: the seed's diagram, top to bottom.

    pixels -> VisionEncoder -> selected hidden states (drop [CLS] under "default")
           -> Projector -> visual tokens (N_images, n_visual, d_language)
    input ids -> embed_tokens, visual tokens scattered over the image placeholder ids
           -> Decoder -> logits
"""

from __future__ import annotations

import torch
from torch import nn

from vlmcli.config import MultiModalConfig
from vlmcli.model.decoder import Decoder
from vlmcli.model.kv_cache import KVCache
from vlmcli.model.projector import Projector
from vlmcli.model.vision import VisionEncoder


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: MultiModalConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision, n_layers=cfg.vision_layers_needed())
        self.projector = Projector(cfg.projection)
        self.decoder = Decoder(cfg.text)

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, n_visual, d_vision * n_feature_layers), before projection."""
        states = self.vision(pixels, self.cfg.vision_feature_layers)
        if self.cfg.vision_feature_select_strategy == "default" and self.cfg.vision.class_token:
            states = [s[:, 1:] for s in states]  # drop [CLS]
        return torch.cat(states, dim=-1) if len(states) > 1 else states[0]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> visual tokens (N, n_visual, d_language)."""
        return self.projector(self.vision_features(pixels))

    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, d) with each image placeholder replaced by a visual token,
        in order: the k-th placeholder gets the k-th visual token of the flattened images."""
        # Placeholder ids may lie outside the embedding table (some checkpoints put <image>
        # past vocab_size); embed them as 0 since they are overwritten anyway.
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        n_visual = 0 if visual_tokens is None else visual_tokens.shape[0] * visual_tokens.shape[1]
        if n_slots != n_visual:
            # sequence.py checks this before any forward pass; this guards direct callers.
            raise ValueError(f"{n_slots} image placeholder tokens but {n_visual} visual tokens")
        if n_slots:
            flat = visual_tokens.reshape(-1, visual_tokens.shape[-1]).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), flat)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None,
        cache: KVCache | None,
        pos: int = 0,
        last_only: bool = True,
    ) -> torch.Tensor:
        """One prefill: ids (B, T) and the images they refer to -> logits."""
        visual = self.encode_images(pixels) if pixels is not None else None
        return self.decoder(self.embed(input_ids, visual), pos, cache, last_only=last_only)
