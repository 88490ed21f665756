"""Qwen2-VL's vision tower and patch merger, as transformers' Qwen2VisionTransformerPretrainedModel.

    patches (N, 3 * 2 * 14 * 14): every image's patches in turn, each image's in 2x2 blocks
      -> Conv3d patch embedding (kernel = stride = (2, 14, 14), no bias)           (N, d)
      -> depth blocks: x + attn(norm1(x)), then x + mlp(norm2(x))
            attention: fused qkv (bias), 2-D RoPE (row and column of each patch, in fp32),
            restricted to each image: one SDPA call per image, so memory grows with the
            largest image's patches squared, never with (N, N) across images
            mlp: fc1 -> quick_gelu -> fc2
      -> merger (our `projector`): LayerNorm, each 2x2 block concatenated, Linear, GELU,
         Linear to the decoder's width                                              (N / 4, d_text)

Parameter names are the checkpoints' (`patch_embed.proj`, `blocks.N.attn.qkv`, `merger.ln_q`,
`merger.mlp.0`), so the qkv stays fused and names map by prefix.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.families.qwen2_vl.config import Qwen2VisionConfig
from vlmcli.model.vision import VisionMLP


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def vision_positions(grids: Sequence[tuple[int, int, int]], merge: int, device=None) -> torch.Tensor:
    """(N, 2) row and column of every patch, in the 2x2-block order the patches come in."""
    out = []
    for t, h, w in grids:
        hpos = torch.arange(h, device=device)[:, None].expand(h, w)
        wpos = torch.arange(w, device=device)[None, :].expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


class VisionRotary(nn.Module):
    """2-D RoPE: a quarter of the head for the row, a quarter for the column, repeated."""

    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.dim = cfg.head_dim // 2
        self.theta = cfg.rope_theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed per call (a few numbers): the model is built on `meta` and loaded, and a
        # buffer would not be
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float, device=positions.device) / self.dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions[..., None].float() * inv_freq  # (N, 2, hd/4)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)  # (N, hd)
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_vision, 3 * cfg.d_vision, bias=True)
        self.proj = nn.Linear(cfg.d_vision, cfg.d_vision)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N, d = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.n_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, nh, hd)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = (q.float() * c + _rotate_half(q.float()) * s).to(x.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(x.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, nh, N, hd)
        outs = [
            F.scaled_dot_product_attention(qi, ki, vi)
            for qi, ki, vi in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
        ]
        y = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return self.proj(y[0].transpose(0, 1).reshape(N, d))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.cfg = cfg
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.num_channels, cfg.d_vision, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x = patches.view(-1, c.num_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, c.d_vision)


class Qwen2VisionTower(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig, n_layers: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = VisionRotary(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers if n_layers is None else n_layers))

    def forward(self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """(N, patch_dim) patches of the images of `grids` -> (N, d_vision) hidden states."""
        x = self.patch_embed(patches)
        cos, sin = self.rotary(vision_positions(grids, self.cfg.spatial_merge_size, x.device))
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return x


class PatchMerger(nn.Module):
    """transformers' PatchMerger: ln_q, then mlp.0 -> GELU -> mlp.2 over each 2x2 block."""

    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        merged = cfg.d_vision * cfg.spatial_merge_size**2
        self.merged = merged
        self.ln_q = nn.LayerNorm(cfg.d_vision, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))
