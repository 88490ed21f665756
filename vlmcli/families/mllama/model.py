"""Llama 3.2 Vision assembled: the tiled ViT -> one Linear into the decoder's width (the
cross-attention states of each image) -> a Llama 3.1 decoder whose `cross_attention_layers`
attend to those states instead of to the text.

    prompt   ... <|image|> text ...        one token per image, embedded like any other
    decoder  self-attention blocks (RoPE, GQA, SwiGLU; shared with every Llama here) and,
             at the cross-attention indices, blocks of
                 x + tanh(attn_gate) * cross_attn(norm(x), image states)
                 x + tanh(mlp_gate) * row_mask * mlp(norm(x))
             (q and k RMS-normalised per head, no RoPE)

Which images a text token sees (transformers' get_cross_attention_token_mask): those of the
latest run of consecutive <|image|> tokens at or before it, and within each image only its
real tiles. A token before the first image sees none: its row of the mask is then open
to every key of every image (padding tiles too) and its MLP output is zeroed. That is what
transformers computes (Meta's reference also zeroes the attention output there); followed
here so logits match it at every position.

The cache (MllamaCache) holds, besides the self-attention keys and values, each image's
cross-attention keys and values for every cross layer, computed once when the image's
prompt is prefilled, and per cache slot which images the token there sees. A chat turn
without a new image computes nothing for the images; a decode step repeats the previous
slot's images, as transformers' generate repeats the last row of the mask. A turn that adds
an image after tokens that see none (the header before the first image, or a text-only
first turn) runs the cached text again against the enlarged set of images, because those
tokens attend to all of them; the earlier images' keys and values are still not recomputed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.errors import UnsupportedModelError
from vlmcli.families.mllama.config import EXTRA_EMBEDDINGS, MllamaConfig
from vlmcli.families.mllama.vision import MllamaVisionTower
from vlmcli.model.decoder import MLP, Decoder, RMSNorm
from vlmcli.model.embedding import Embedding
from vlmcli.model.kv_cache import KVCache
from vlmcli.model.multimodal import VisionLanguageModel
from vlmcli.model.rope import RotaryEmbedding


NO_BATCH = "Llama 3.2 Vision decodes one sequence at a time (its images are per sequence): vlm serve cannot batch it yet"


class MllamaCache(KVCache):
    """The self-attention cache (one layer per self-attention block) plus the images.

    xk, xv (n_cross, B, n_kv, n_images * tiles * P, hd): the images' keys and values, in
    prompt order; grown when a prompt brings images (never by a decode step), so a decode
    step's shapes stay fixed between images. tile_real (n_images, tiles): real tiles.
    sees (max_len, n_images): the images each slot's token attends to; is_image (max_len,):
    whether that token is an <|image|> (a run of them shares one set of images)."""

    def __init__(self, n_layers, n_kv_heads, head_dim, max_len, *, n_cross, tiles, positions, batch=1,
                 dtype=torch.float32, device="cpu"):
        super().__init__(n_layers, n_kv_heads, head_dim, max_len, batch=batch, dtype=dtype, device=device)
        self.tiles, self.positions = tiles, positions
        empty = torch.zeros(n_cross, batch, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.xk, self.xv = empty, empty.clone()
        self.tile_real = torch.zeros(0, tiles, dtype=torch.bool, device=device)
        self.sees = torch.zeros(max_len, 0, dtype=torch.bool, device=device)
        self.is_image = torch.zeros(max_len, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(max_len, dtype=torch.long, device=device)  # what each slot holds

    def view(self, rows: slice = slice(None), length: int | None = None) -> "KVCache":
        # a plain view would drop the images without a word
        raise UnsupportedModelError(NO_BATCH)

    @property
    def n_images(self) -> int:
        return self.tile_real.shape[0]

    def keep_images(self, n: int) -> None:
        """Forget the images after the first n (their prompt is being rewritten)."""
        if n < self.n_images:
            per_image = self.tiles * self.positions
            self.xk, self.xv = self.xk[:, :, :, : n * per_image], self.xv[:, :, :, : n * per_image]
            self.tile_real, self.sees = self.tile_real[:n], self.sees[:, :n]

    def add_images(self, k: torch.Tensor, v: torch.Tensor, tile_real: torch.Tensor) -> None:
        """k, v (n_cross, B, n_kv, n_new * tiles * P, hd); tile_real (n_new, tiles)."""
        self.xk = torch.cat([self.xk, k.to(self.xk.dtype)], dim=3)
        self.xv = torch.cat([self.xv, v.to(self.xv.dtype)], dim=3)
        self.tile_real = torch.cat([self.tile_real, tile_real.to(self.tile_real.device)])
        new = torch.zeros(self.max_len, tile_real.shape[0], dtype=torch.bool, device=self.sees.device)
        self.sees = torch.cat([self.sees, new], dim=1)

    def mark(self, start: int, ids: Sequence[int], image_token_id: int) -> None:
        """Which images the tokens `ids` at slots start.. see (the prefill's host side)."""
        first = int(self.is_image[:start].sum())  # the index of the next <|image|>'s image
        group = self.sees[start - 1].clone() if start else torch.zeros(self.n_images, dtype=torch.bool)
        after_image = bool(self.is_image[start - 1]) if start else False
        rows, flags = [], []
        for token in ids:
            image = token == image_token_id
            if image:
                if not after_image:
                    group = torch.zeros_like(group)
                group[first] = True
                first += 1
            after_image = image
            rows.append(group.clone())
            flags.append(image)
        end = start + len(ids)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.sees[start:end] = torch.stack(rows).to(self.sees.device)
        self.is_image[start:end] = torch.tensor(flags, device=self.is_image.device)
        self.tokens[start:end] = torch.tensor(list(ids), device=self.tokens.device)

    def blind_before(self, start: int) -> bool:
        """Whether a token before `start` sees no image: its cross-attention output is
        taken over every image of the cache, so it changes when an image is added."""
        return start > 0 and not bool(self.sees[:start].any(dim=1).all())

    def decoded(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """A decoded token (1, T) at `slots` sees what the token before it saw, as text
        (tensor ops only: capturable)."""
        self.sees.index_copy_(0, slots, self.sees.index_select(0, slots - 1))
        self.is_image.index_fill_(0, slots, False)
        self.tokens.index_copy_(0, slots, tokens.reshape(-1))

    def cross_mask(self, slots: int | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the tokens at `slots`: the boolean key mask (1, 1, T, n_images * tiles * P) and
        the row mask (1, T, 1), 0 where a token sees no image (its keys then all open)."""
        rows = self.sees[slots : slots + length] if isinstance(slots, int) else self.sees.index_select(0, slots)
        tiles = (rows[:, :, None] & self.tile_real[None]).reshape(rows.shape[0], -1)  # (T, n_images * tiles)
        keys = tiles.repeat_interleave(self.positions, dim=1)
        seen = keys.any(dim=1, keepdim=True)  # (T, 1)
        return (keys | ~seen)[None, None], seen[None].to(self.xk.dtype)


class CrossAttention(nn.Module):
    def __init__(self, cfg, eps: float):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attention_dtype: torch.dtype | None = None
        d = cfg.d_model
        self.q_proj = nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image states (n, L, d) -> k, v (1, n_kv, n * L, hd), images one after another."""
        n, L, _ = states.shape
        k = self.k_norm(self.k_proj(states).view(n, L, self.n_kv, self.head_dim))
        v = self.v_proj(states).view(n, L, self.n_kv, self.head_dim)
        shape = (1, n * L, self.n_kv, self.head_dim)
        return k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        dtype = q.dtype
        if self.attention_dtype is not None and self.attention_dtype != dtype:
            q, k, v = q.to(self.attention_dtype), k.to(self.attention_dtype), v.to(self.attention_dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads).to(dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class CrossBlock(nn.Module):
    """MllamaCrossAttentionDecoderLayer: no self-attention; both residual branches gated."""

    def __init__(self, cfg, index: int):
        super().__init__()
        self.index = index  # among the cross-attention blocks: its slice of the cache's xk / xv
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg, cfg.norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        # the loader's fusion pass looks at every block's self_attn and mlp; this one has
        # no self-attention (its MLP is fused like any other)
        self.self_attn = None

    def forward(self, x: torch.Tensor, cache: MllamaCache, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        h = self.cross_attn(self.input_layernorm(x), cache.xk[self.index], cache.xv[self.index], mask)
        x = x + self.cross_attn_attn_gate.tanh() * h
        h = self.mlp(self.post_attention_layernorm(x)) * rows
        return x + self.cross_attn_mlp_gate.tanh() * h


class MllamaDecoder(Decoder):
    """A Llama decoder whose layers at `cross_attention_layers` are CrossBlocks.

    `layers` holds every block at its checkpoint index; the self-attention blocks write the
    cache's layers 0.. in order (cross blocks take no slot there)."""

    def __init__(self, cfg: MllamaConfig):
        selfs = cfg.self_attention_layers
        super().__init__(dataclasses.replace(cfg.text, n_layers=len(selfs)))
        t = cfg.text
        self.embed_tokens = Embedding(t.vocab_size + EXTRA_EMBEDDINGS, t.d_model)
        blocks = iter(self.layers)
        self.cross_indices = tuple(cfg.cross_attention_layers)
        layers: list[nn.Module] = []
        for i in range(t.n_layers):
            if i in self.cross_indices:
                layers.append(CrossBlock(t, self.cross_indices.index(i)))
            else:
                layers.append(next(blocks))
        self.layers = nn.ModuleList(layers)
        self.vision_positions = cfg.vision.patches_per_tile
        self.vision_tiles = cfg.vision.max_num_tiles

    def setup(self, device, attention_dtype: torch.dtype | None = None) -> None:
        self.rope = RotaryEmbedding(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings, device)
        for block in self.layers:
            attn = block.cross_attn if isinstance(block, CrossBlock) else block.self_attn
            attn.attention_dtype = attention_dtype

    def tie_weights(self, head: nn.Module) -> None:
        raise ValueError("Llama 3.2 Vision's embedding has 8 rows more than lm_head: they cannot be tied")

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> MllamaCache:
        if batch != 1:
            raise UnsupportedModelError(NO_BATCH)
        w = self.embed_tokens.weight
        max_len = max_len or self.cfg.max_position_embeddings
        if self.rope is not None:
            self.rope.reserve(max_len)
        c = self.cfg
        return MllamaCache(
            c.n_layers, c.n_kv_heads, c.head_dim, max_len, n_cross=len(self.cross_indices),
            tiles=self.vision_tiles, positions=self.vision_positions, dtype=w.dtype, device=w.device,
        )

    def run_layers(self, x, cos, sin, slots, cache, masks: dict, last_only: bool) -> torch.Tensor:
        # Without images (none in the cache) the cross blocks are skipped, as transformers
        # skips them when it has no cross-attention states.
        images = isinstance(cache, MllamaCache) and cache.n_images > 0
        mask = rows = None
        if images:
            mask, rows = cache.cross_mask(slots, x.shape[1])
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            only_last = last_only and i == last
            if isinstance(block, CrossBlock):
                if not images:
                    continue
                if only_last and x.shape[1] > 1:
                    x, mask, rows = x[:, -1:], mask[:, :, -1:], rows[:, -1:]
                x = block(x, cache, mask, rows)
            else:
                x = block(x, cos, sin, slots, cache, masks, last_only=only_last)
        return x


class MllamaModel(VisionLanguageModel):
    cfg: MllamaConfig

    def __init__(self, cfg: MllamaConfig, full: bool = False):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.vision = MllamaVisionTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.d_out, cfg.text.d_model, bias=True)
        self.decoder = MllamaDecoder(cfg)

    # ---- images

    def aspect_ratio_ids(self, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        ratios = list(self.cfg.vision.supported_aspect_ratios)
        return torch.tensor([ratios.index((h, w)) + 1 for _, h, w in grids])

    def tile_mask(self, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        tiles = self.cfg.vision.max_num_tiles
        return torch.tensor([[t < h * w for t in range(tiles)] for _, h, w in grids])

    def image_states(self, pixels: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Pixels (N, tiles, 3, S, S) and each image's tile grid (1, rows, cols) -> the
        projected states (N, tiles * P, d_text) the cross-attention layers read."""
        device = pixels.device
        features = self.vision(pixels, self.aspect_ratio_ids(grids).to(device), self.tile_mask(grids).to(device))
        N, T, P, _ = features.shape
        return self.projector(features).reshape(N, T * P, -1)

    def encode(self, prepared) -> list[torch.Tensor]:
        """One (1, tiles * P, d_text + 1) tensor per image: its states, and a last column
        telling real tiles (1) from padding (0), so that the tile mask travels with the
        states through every caller (the chat session keeps them per image)."""
        if prepared.grids is None:
            raise ValueError("Llama 3.2 Vision images need their tile grids")
        states = self.image_states(prepared.pixels, prepared.grids)
        real = self.tile_mask(prepared.grids).to(states.device)
        flag = real.repeat_interleave(self.cfg.vision.patches_per_tile, dim=1).to(states.dtype)[..., None]
        return list(torch.cat([states, flag], dim=-1)[:, None])

    def encode_images(self, pixels, image_sizes=None, views_per_image=None):
        raise NotImplementedError("Llama 3.2 Vision encodes tiles with their grids (encode / image_states)")

    def _add_images(self, visual, cache: MllamaCache) -> int:
        """Cross-attention keys and values of each cross layer for the images `visual`
        (as `encode` gives them), into the cache: the only place they are computed."""
        if visual is None:
            return 0
        if isinstance(visual, torch.Tensor):
            visual = [visual]
        if len(visual) == 0:
            return 0
        width = visual[0].shape[-1]
        L = self.cfg.vision.max_num_tiles * self.cfg.vision.patches_per_tile
        flat = torch.cat([v.reshape(-1, L, width) for v in visual])  # (n, L, d + 1)
        states, flag = flat[..., :-1], flat[..., -1]
        tile_real = flag.reshape(flat.shape[0], self.cfg.vision.max_num_tiles, -1)[:, :, 0] > 0.5
        cross = [b for b in self.decoder.layers if isinstance(b, CrossBlock)]
        ks, vs = zip(*(b.cross_attn.keys_values(states) for b in cross))
        cache.add_images(torch.stack(ks), torch.stack(vs), tile_real)
        return flat.shape[0]

    # ---- the model contract

    def new_cache(self, length: int, batch: int = 1) -> MllamaCache:
        return self.decoder.new_cache(length, batch)

    def embed(self, input_ids: torch.Tensor, visual_tokens=None) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)  # <|image|> has an embedding of its own

    def prefill(self, ids, visual, cache: MllamaCache, start: int = 0, *, prefix: int = 0, positions=None):
        if ids.shape[0] != 1:
            raise ValueError("Llama 3.2 Vision prefills one sequence at a time")
        tokens = ids[0].tolist()
        image_id = self.cfg.image_token_id
        before = int(cache.is_image[:start].sum())
        cache.keep_images(before)
        added = self._add_images(visual, cache)
        needed = tokens.count(image_id)
        if added != needed:
            # sequence.py checks this before any forward pass; this guards direct callers
            raise ValueError(f"{needed} <|image|> tokens but {added} new images")
        if added and cache.blind_before(start):
            # transformers attends from those tokens to every image of the prompt: a fresh
            # run over this prompt would give them (and all after them) other values, so the
            # text before `start` is run again against the images now cached (only the
            # text: the images' keys and values are not recomputed)
            tokens = cache.tokens[:start].tolist() + tokens
            ids = torch.tensor([tokens], device=ids.device)
            start = 0
        cache.mark(start, tokens, image_id)
        return self.decoder(self.embed(ids), start, cache, positions=positions)[:, -1]

    def step(self, tokens, slots, cache: MllamaCache, positions=None):
        if isinstance(slots, int):
            cache.decoded(torch.tensor([slots], device=cache.sees.device), tokens)
        else:
            if slots.dim() != 1:
                raise ValueError("Llama 3.2 Vision decodes one sequence at a time")
            cache.decoded(slots, tokens)
        return self.decoder(self.decoder.embed_tokens(tokens), slots, cache, positions=positions)[:, -1]

    def forward(self, input_ids, pixels, cache, pos: int = 0, last_only: bool = True, grids=None):
        """Logits for a whole prompt (tests): ids (1, T) with pixels (N, tiles, 3, S, S)."""
        cache = cache if cache is not None else self.new_cache(input_ids.shape[1] + pos)
        visual = None
        if pixels is not None:
            from vlmcli.processor import PreparedImages

            visual = self.encode(PreparedImages(pixels, [], [], [1] * len(grids), grids=list(grids)))
        tokens = input_ids[0].tolist()
        cache.keep_images(int(cache.is_image[:pos].sum()))
        self._add_images(visual, cache)
        cache.mark(pos, tokens, self.cfg.image_token_id)
        return self.decoder(self.embed(input_ids), pos, cache, last_only=last_only)

    @property
    def capturable(self) -> bool:
        return self.cfg.text.rope.rope_type != "dynamic"
