"""The QWen decoder: vlm's shared Decoder (a Qwen2: RMSNorm, q/k/v biases, SwiGLU, RoPE)
with q/k/v fused as c_attn stores them, and what modeling_qwen.py adds past `seq_length`
when its config turns them on:

    use_dynamic_ntk  a prefill from position 0 over L tokens sets
                     ntk_alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1) and RoPE's base
                     becomes base * ntk_alpha^(d / (d - 2)) for it and every decode step after
                     (keys are cached rotated, so earlier tokens keep theirs): 1 up to
                     seq_length tokens, 3 up to twice that, 7 up to four times ...
    use_logn_attn    the query at position p (0-based) is scaled by log(p + 1) / log(seq_length)
                     once p + 1 > seq_length (1 before), after RoPE

Within seq_length tokens both are exactly the plain decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmcli.config import TextConfig
from vlmcli.model.decoder import Attention, Decoder
from vlmcli.model.rope import RotaryEmbedding, cos_sin


def ntk_alpha(length: int, seq_length: int) -> float:
    """modeling_qwen.py's alpha for a fresh prefill of `length` tokens."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


class NTKRotaryEmbedding(RotaryEmbedding):
    """RoPE whose base follows the alpha of the last fresh prefill. The tables are rebuilt in
    place (same buffers, same size), so a captured decode step keeps reading the right ones."""

    alpha: float = 1.0

    def set_alpha(self, alpha: float) -> None:
        if alpha == self.alpha:
            return
        d = self.head_dim
        base = self.rope.theta * alpha ** (d / (d - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=self.inv_freq.device).float() / d))
        self.inv_freq.copy_(inv_freq)
        cos, sin = cos_sin(self.inv_freq, self.attention_scaling, 0, self.cos.shape[0])
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.alpha = alpha


class LognAttention(Attention):
    """Attention whose queries are scaled per position (`query_scale`, set by the decoder
    for each forward call; None: unscaled)."""

    query_scale: torch.Tensor | None = None

    def _project(self, x: torch.Tensor):
        q, k, v = super()._project(x)
        if self.query_scale is not None:
            # a per-position scalar commutes with the rotation, so scaling before RoPE is the
            # published scaling after it
            q = q * self.query_scale.to(q.dtype)
        return q, k, v


class QwenDecoder(Decoder):
    def __init__(self, cfg: TextConfig, seq_length: int, dynamic_ntk: bool, logn: bool):
        super().__init__(cfg)
        self.seq_length, self.dynamic_ntk, self.logn = seq_length, dynamic_ntk, logn
        for i, layer in enumerate(self.layers):
            if logn:
                layer.self_attn = LognAttention(cfg, i)
            width = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
            layer.self_attn.fuse_qkv(nn.Linear(cfg.d_model, width, bias=True))  # c_attn, bias included

    def setup(self, device, attention_dtype: torch.dtype | None = None) -> None:
        super().setup(device, attention_dtype)
        if self.dynamic_ntk:
            rope = self.rope
            self.rope = NTKRotaryEmbedding(rope.rope, rope.head_dim, rope.max_position_embeddings, device)

    def _query_scale(self, slots, T: int, device) -> torch.Tensor:
        if isinstance(slots, int):
            positions = torch.arange(slots, slots + T, device=device)
        else:
            positions = slots
        n = (positions + 1).float()
        scale = torch.where(n > self.seq_length, torch.log(n) / math.log(self.seq_length), torch.ones_like(n))
        return scale[..., None]  # (T, 1) or (B, T, 1): over the query's width

    def forward(self, embeds, slots, cache, last_only: bool = True, *, positions=None, prefix: int = 0):
        T = embeds.shape[1]
        if self.dynamic_ntk and isinstance(slots, int) and slots == 0:
            # a fresh prefill: modeling_qwen.py recomputes alpha when nothing is cached
            self.rope.reserve(T)
            self.rope.set_alpha(ntk_alpha(T, self.seq_length))
        if self.logn:
            scale = self._query_scale(slots if positions is None else positions, T, embeds.device)
            for layer in self.layers:
                layer.self_attn.query_scale = scale
        return super().forward(embeds, slots, cache, last_only, positions=positions, prefix=prefix)
