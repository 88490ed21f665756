"""The whole vision-language model: the seed's diagram, top to bottom.

    pixels -> VisionEncoder -> selected hidden states (drop the first under "default")
           -> Projector -> visual tokens (N_images, n_visual, d_language)
    input ids -> embed_tokens, visual tokens scattered over the image placeholder ids
           -> Decoder -> logits

Families build on this: LLaVA-NeXT / OneVision pack each image's tiles into one sequence
(vlmcli/families/llava/model.py), so images may have different token counts and visual
tokens travel as a list with one (n_i, d_language) tensor per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch
from torch import nn

from vlmcli.config import MultiModalConfig
from vlmcli.model.decoder import Decoder
from vlmcli.model.kv_cache import KVCache
from vlmcli.model.projector import Projector
from vlmcli.model.vision import VisionEncoder

if TYPE_CHECKING:
    from vlmcli.processor import PreparedImages

# (N, n, d) when every image has the same count, else one (n_i, d) tensor per image
VisualTokens = Union[torch.Tensor, Sequence[torch.Tensor]]


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
        features = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        if self.cfg.vision_feature_select_strategy == "default":
            # drops CLIP's [CLS]; a tower without one (SigLIP) loses its first patch, as in
            # transformers, which is why such checkpoints use "full"
            features = features[:, 1:]
        return features

    def encode_images(
        self,
        pixels: torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        views_per_image: Sequence[int] | None = None,
    ) -> VisualTokens:
        """Pixels (N, 3, H, W), one view per image -> visual tokens (N, n_visual, d_language).
        Families whose images have several views (tiles) pack them per image here."""
        return self.projector(self.vision_features(pixels))

    def encode(self, prepared: PreparedImages) -> VisualTokens:
        """A processor's prepared images (pixels already on the model's device) -> visual
        tokens, one (n_i, d) row block per image in prompt order."""
        return self.encode_images(prepared.pixels, prepared.image_sizes, prepared.views_per_image)

    def embed(self, input_ids: torch.Tensor, visual_tokens: VisualTokens | None) -> torch.Tensor:
        """Token embeddings (B, T, d) with each image placeholder replaced by a visual token,
        in order: the k-th placeholder gets the k-th visual token of the flattened images."""
        # Placeholder ids may lie outside the embedding table (some checkpoints put <image>
        # past vocab_size); embed them as 0 since they are overwritten anyway.
        is_image = input_ids == self.cfg.image_token_id
        embeds = self.decoder.embed_tokens(input_ids.masked_fill(is_image, 0))
        flat = flatten_visual(visual_tokens)
        n_slots = int(is_image.sum())
        n_visual = 0 if flat is None else flat.shape[0]
        if n_slots != n_visual:
            # sequence.py checks this before any forward pass; this guards direct callers.
            raise ValueError(f"{n_slots} image placeholder tokens but {n_visual} visual tokens")
        if n_slots:
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), flat.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None,
        cache: KVCache | None,
        pos: int = 0,
        last_only: bool = True,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        views_per_image: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One prefill: ids (B, T) and the images they refer to -> logits."""
        visual = None
        if pixels is not None:
            visual = self.encode_images(pixels, image_sizes, views_per_image)
        return self.decoder(self.embed(input_ids, visual), pos, cache, last_only=last_only)


    # ---- the model contract (see vlmcli/families/__init__.py): what generate, chat and
    # the server call, whatever the family

    def new_cache(self, length: int, batch: int = 1) -> KVCache:
        return self.decoder.new_cache(length, batch)

    def prefill(
        self,
        ids: torch.Tensor,
        visual: VisualTokens | None,
        cache: KVCache,
        start: int = 0,
        *,
        prefix: int = 0,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids (B, T) at cache slots start..start+T-1, with `visual` in their image slots ->
        next-token logits (B, vocab). prefix: how many slots from 0 attend both ways."""
        embeds = self.embed(ids, visual)
        return self.decoder(embeds, start, cache, positions=positions, prefix=prefix)[:, -1]

    def step(
        self, tokens: torch.Tensor, slots: int | torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One decode step: tokens (B, 1) at cache slot `slots` -> logits (B, vocab). With
        slots a LongTensor (1,) the step has fixed shapes and no host values, so
        `torch.compile` and CUDA graphs capture it once for every token (see generate.py)."""
        return self.decoder(self.decoder.embed_tokens(tokens), slots, cache, positions=positions)[:, -1]

    @property
    def capturable(self) -> bool:
        """Whether `step` with tensor slots is exact: dynamic NTK RoPE recomputes its tables
        from the sequence length on the host, past the trained length."""
        return self.cfg.text.rope.rope_type != "dynamic"


def flatten_visual(visual: VisualTokens | None) -> torch.Tensor | None:
    """Visual tokens in placeholder order as one (n, d) tensor."""
    if visual is None:
        return None
    if isinstance(visual, torch.Tensor):
        return visual.reshape(-1, visual.shape[-1])
    if len(visual) == 0:
        return None
    return torch.cat([v.reshape(-1, v.shape[-1]) for v in visual], dim=0)
