"""PaliGemma assembled from the shared blocks: SigLIP (its last hidden state, after
post_layernorm) -> one linear projection -> visual tokens scattered over the <image> slots
-> a Gemma or Gemma2 decoder under a prefix-LM mask (image + prompt attend both ways, the
answer causally; the processor says how long the prefix is).

transformers' PaliGemma counts RoPE positions from 1 (`position_ids = cache_position + 1`,
in the forward pass and in generate): cache slot s is position s + 1 here too, so the RoPE
tables are built one row longer than the cache.
"""

from __future__ import annotations

import torch

from vlmcli.config import MultiModalConfig
from vlmcli.model.kv_cache import KVCache
from vlmcli.model.multimodal import VisionLanguageModel, VisualTokens
from vlmcli.model.vision import VisionEncoder


class PaliGemmaModel(VisionLanguageModel):
    def __init__(self, cfg: MultiModalConfig):
        super().__init__(cfg)
        # every block, then post_layernorm: SiglipVisionModel's last_hidden_state
        self.vision = VisionEncoder(cfg.vision, n_layers=cfg.vision.n_layers, post_layernorm=True)

    def _positions(self, slots: int | torch.Tensor, length: int, device) -> torch.Tensor:
        if isinstance(slots, int):  # eager: the tables may grow (on the host)
            self.decoder.rope.reserve(slots + 1 + length)
            return torch.arange(slots + 1, slots + 1 + length, device=device)
        return slots + 1  # a tensor op: the compiled step keeps no host values

    def new_cache(self, length: int, batch: int = 1) -> KVCache:
        cache = self.decoder.new_cache(length, batch)
        if self.decoder.rope is not None:
            self.decoder.rope.reserve(cache.max_len + 1)  # slot max_len - 1 is position max_len
        return cache

    def forward(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None,
        cache: KVCache | None,
        pos: int = 0,
        last_only: bool = True,
        image_sizes=None,
        views_per_image=None,
        *,
        prefix: int = 0,
    ) -> torch.Tensor:
        """One prefill (logits at every position with last_only=False): ids (B, T) and their
        images; `prefix` slots from 0 attend both ways."""
        visual = self.encode_images(pixels) if pixels is not None else None
        embeds = self.embed(input_ids, visual)
        positions = self._positions(pos, embeds.shape[1], embeds.device)
        return self.decoder(embeds, pos, cache, last_only=last_only, positions=positions, prefix=prefix)

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
        """As VisionLanguageModel.prefill; `positions` (default: the slots) are shifted by one."""
        embeds = self.embed(ids, visual)
        if positions is None:
            positions = self._positions(start, ids.shape[1], embeds.device)
        else:
            positions = positions + 1
        return self.decoder(embeds, start, cache, positions=positions, prefix=prefix)[:, -1]

    def step(
        self, tokens: torch.Tensor, slots: int | torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As VisionLanguageModel.step, at position slot + 1 (capturable with tensor slots)."""
        positions = self._positions(slots, tokens.shape[1], tokens.device) if positions is None else positions + 1
        return self.decoder(self.decoder.embed_tokens(tokens), slots, cache, positions=positions)[:, -1]
