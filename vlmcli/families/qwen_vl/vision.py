"""Qwen-VL's vision side (visual.py): a 448 px ViT-bigG and the attention-pool resampler.

    pixels (N, 3, 448, 448) -> conv1 (14 px patches, no bias) -> (N, 32*32, 1664)
      + positional_embedding: a learned 16 x 16 grid, bicubic-interpolated to 32 x 32
      -> ln_pre -> 48 resblocks: x + attn(ln_1(x)), x + mlp(ln_2(x))   (exact GELU)
    -> resampler (attn_pool): 256 learned queries attend once over the patches
         q = ln_q(query) + pos(16 x 16), k = ln_kv(kv_proj(x)) + pos(interpolated to 32 x 32),
         v = ln_kv(kv_proj(x)); one multi-head attention (output_dim // 128 heads)
      -> ln_post -> @ proj                                          (N, 256, 4096)

The positions of the resampler are a fixed 2-D sin-cos table (stored in the checkpoint as
attn_pool.pos_embed); `sincos_2d` computes it, for tests and for checkpoints without it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.families.qwen_vl.config import RESAMPLER_HEAD_DIM, QwenVisualConfig


def interpolate_positions(pos: torch.Tensor, n: int) -> torch.Tensor:
    """visual.py's get_abs_pos: an (L, C) table of a square grid -> (n, C), bicubic without
    corner alignment in fp32 when the sides differ (32 patches a side against 16 rows)."""
    src, dst = math.isqrt(pos.shape[0]), math.isqrt(n)
    if src == dst:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """(side*side, dim) MAE-style 2-D sin-cos positions as visual.py builds them (numpy fp32,
    then fp64 concatenation, stored as fp32): the first half encodes the column (the
    meshgrid's w comes first), the second the row; each half is [sin, cos] of
    pos * 10000^(-2i/(dim/2))."""
    grid_h = np.arange(side, dtype=np.float32)
    grid_w = np.arange(side, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, side, side)

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float()


class VisualAttention(nn.Module):
    """Self-attention with visual.py's packed in_proj: its 3 * width outputs are laid out
    head by head, [q_h | k_h | v_h] for each head h (not [q | k | v] as in nn.MultiheadAttention)."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, width // n_heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.in_proj(x).view(B, T, self.n_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # nn.GELU: the exact (erf) form


class VisualBlock(nn.Module):
    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.attn = VisualAttention(cfg.d_vision, cfg.n_heads)
        self.ln_2 = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.mlp = VisualMLP(cfg.d_vision, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """visual.py's `transformer`: a list of resblocks (the name is the checkpoint's)."""

    def __init__(self, cfg: QwenVisualConfig, n_layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(cfg) for _ in range(n_layers))


class QwenVisionTower(nn.Module):
    """conv1 -> + interpolated positions -> ln_pre -> resblocks: (N, patches, width)."""

    def __init__(self, cfg: QwenVisualConfig, n_layers: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.d_vision, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.n_positions, cfg.d_vision))
        self.ln_pre = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.transformer = VisualTransformer(cfg, cfg.n_layers if n_layers is None else n_layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # (N, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (N, grid*grid, width)
        x = x + interpolate_positions(self.positional_embedding, x.shape[1])
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return x


class CrossAttention(nn.Module):
    """nn.MultiheadAttention's math and parameter names (in_proj_weight / in_proj_bias with
    [q | k | v] rows, out_proj), written out so a backend may materialize out_proj as any
    Linear: visual.py's resampler is an nn.MultiheadAttention."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Lq, d), k and v (B, Lk, d) -> (B, Lq, d)."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        B, Lq, d = q.shape
        hd = d // self.n_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, -1, self.n_heads, hd).transpose(1, 2)

        q, k, v = heads(F.linear(q, wq, bq)), heads(F.linear(k, wk, bk)), heads(F.linear(v, wv, bv))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, Lq, d))


class Resampler(nn.Module):
    """visual.py's attn_pool: n_queries learned queries, one cross-attention over the patches."""

    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        d = cfg.output_dim
        self.query = nn.Parameter(torch.empty(cfg.n_queries, d))
        self.pos_embed = nn.Parameter(torch.empty(cfg.n_queries, d), requires_grad=False)
        # visual.py: a kv_proj only when the tower's width differs (nn.Identity otherwise)
        self.kv_proj = nn.Linear(cfg.d_vision, d, bias=False) if cfg.d_vision != d else nn.Identity()
        self.attn = CrossAttention(d, d // RESAMPLER_HEAD_DIM)
        self.ln_q = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ln_kv = nn.LayerNorm(d, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, patches, width) -> (N, n_queries, output_dim)."""
        key_pos = interpolate_positions(self.pos_embed, x.shape[1]).to(x.dtype)
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed.to(x.dtype)).expand(x.shape[0], -1, -1)
        return self.attn(q, x + key_pos, x)


class QwenVLProjector(nn.Module):
    """The resampler, ln_post and the (d, d) proj matrix (x @ proj, no bias): the seed's
    cross-attention projection."""

    def __init__(self, cfg: QwenVisualConfig):
        super().__init__()
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=cfg.norm_eps)
        self.proj = nn.Parameter(torch.empty(cfg.output_dim, cfg.output_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.attn_pool(features)) @ self.proj
