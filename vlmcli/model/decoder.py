"""The language decoder: a LLaMA-family transformer fed with input embeddings.

    embeddings (B, T, d)  [text tokens with the visual tokens already scattered in]
      -> n blocks: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x))
         attention: RoPE on q and k, grouped-query (n_kv_heads <= n_heads), static KV cache
         mlp: down(silu(gate(x)) * up(x))
      -> rmsnorm -> lm_head -> logits (B, T or 1, vocab)

Parameter names follow Hugging Face Llama checkpoints so the loader maps them by prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.config import TextConfig
from vlmcli.model.activations import activation
from vlmcli.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even for 16-bit activations: the mean of squares overflows fp16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables in fp32, grown on demand: a 128k-context config costs nothing until
    that many positions are used."""

    def __init__(self, head_dim: int, theta: float, max_len: int, device=None):
        super().__init__()
        self.max_len = max_len
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0, head_dim, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim, device=device), persistent=False)

    def _grow(self, needed: int) -> None:
        n = min(max(needed, 2 * self.cos.shape[0], 256), max(needed, self.max_len))
        freqs = torch.arange(n, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)  # (n, head_dim), halves repeated
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, pos: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if pos + length > self.cos.shape[0]:
            self._grow(pos + length)
        return self.cos[pos : pos + length].to(dtype), self.sin[pos : pos + length].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin  # x (B, nh, T, hd), cos/sin (T, hd)


def causal_mask(pos: int, length: int, device) -> torch.Tensor | None:
    """Boolean mask for `length` queries starting at `pos` over keys 0..pos+length-1.

    None when SDPA's own handling is exact: one query sees every cached key, and a prefill
    from position 0 is plain causal."""
    if length == 1 or pos == 0:
        return None
    q = torch.arange(pos, pos + length, device=device)[:, None]
    k = torch.arange(pos + length, device=device)[None, :]
    return k <= q  # (T, pos+T)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)

    def forward(self, x, cos, sin, pos: int, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, pos, k, v)  # (B, nkv, pos+T, hd)
        else:  # a whole sequence at once (training, scoring): keys are just this chunk
            pos = 0
        mask = causal_mask(pos, T, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=(mask is None and T > 1), enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos: int, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None

    def tie_weights(self) -> None:
        self.lm_head.weight = self.embed_tokens.weight

    def setup(self, device) -> None:
        """Build the tables that are computed rather than loaded (after the weights are in)."""
        self.rope = RotaryEmbedding(
            self.cfg.head_dim, self.cfg.rope_theta, self.cfg.max_position_embeddings, device
        )

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(
            self.cfg.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            max_len or self.cfg.max_position_embeddings,
            batch=batch,
            dtype=w.dtype,
            device=w.device,
        )

    def forward(
        self, embeds: torch.Tensor, pos: int, cache: KVCache | None, last_only: bool = True
    ) -> torch.Tensor:
        """embeds (B, T, d) for positions pos..pos+T-1 -> logits (B, 1 or T, vocab).

        Without a cache the sequence is attended to on its own (training and scoring)."""
        T = embeds.shape[1]
        cos, sin = self.rope(pos, T, embeds.dtype)
        x = embeds
        for block in self.layers:
            x = block(x, cos, sin, pos, cache)
        if last_only:  # generation needs only the next-token distribution
            x = x[:, -1:]
        return self.lm_head(self.norm(x))
