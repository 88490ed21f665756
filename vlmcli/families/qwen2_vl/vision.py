"""Qwen2-VL's and Qwen2.5-VL's vision tower and patch merger, as transformers'
Qwen2VisionTransformerPretrainedModel and Qwen2_5_VisionTransformerPretrainedModel.

    patches (N, 3 * 2 * 14 * 14): every image's patches in turn, each image's in 2x2 blocks
      -> Conv3d patch embedding (kernel = stride = (2, 14, 14), no bias)           (N, d)
      -> depth blocks: x + attn(norm1(x)), then x + mlp(norm2(x))
            attention: fused qkv (bias), 2-D RoPE (row and column of each patch, in fp32),
            restricted to each image (Qwen2-VL; Qwen2.5-VL's fullatt_block_indexes) or to
            each window of window_size px (Qwen2.5-VL's other blocks): one SDPA call per
            image or window, without a mask, so nothing (N, N) is ever built (SDPA's flash
            kernels keep even one run's scores in tiles); the token-wise parts run ROWS
            patches at a time (benchmarks/vision_memory.py)
            norms: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL)
            mlp: fc1 -> quick_gelu -> fc2 (Qwen2-VL) or SwiGLU with biases (Qwen2.5-VL)
      -> merger (our `projector`): ln_q (LayerNorm / RMSNorm), each 2x2 block concatenated,
         Linear, GELU, Linear to the decoder's width                                (N / 4, d_text)

Windows (Qwen2.5-VL): the tower reorders the 2x2 blocks once after the patch embedding so
that each window's blocks are consecutive (window by window, row-major, as transformers'
get_vision_window_index), runs every block in that order (an image's blocks stay together,
so full-attention blocks see whole images), and puts them back before the merger, which
works block by block.

Parameter names are the checkpoints' (`patch_embed.proj`, `blocks.N.attn.qkv`, `merger.ln_q`,
`merger.mlp.0`), so the qkv stays fused and names map by prefix.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.config import TextConfig
from vlmcli.families.qwen2_vl.config import Qwen2VisionConfig
from vlmcli.model.decoder import MLP, RMSNorm
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


def window_order(grids: Sequence[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The 2x2 blocks (merge units) of every frame, window by window: `window` x `window`
    blocks a window, windows row-major over the frame (the last ones cut short at the
    edges), row-major inside; and the patch count of each window.

    Returns (order, lengths): order[i] is the index (in the processor's order) of the i-th
    block in window order, the same permutation as transformers' get_vision_window_index."""
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        bh, bw = h // merge, w // merge
        rows = torch.arange(bh).repeat_interleave(bw)
        cols = torch.arange(bw).repeat(bh)
        across = -(-bw // window)
        window_of = (rows // window) * across + cols // window  # every block's window
        frame = torch.argsort(window_of, stable=True)  # stable: row-major inside a window
        counts = (torch.bincount(window_of) * merge * merge).tolist()  # no window is empty
        for f in range(t):
            order.append(frame + offset + f * bh * bw)
            lengths += counts
        offset += t * bh * bw
    return torch.cat(order), lengths


def permute_blocks(x: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of x taken `unit` at a time (one 2x2 block) in `order`."""
    return x.view(-1, unit, *x.shape[1:])[order].view(x.shape)


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


# The token-wise parts (qkv + RoPE, proj, norm + MLP) run this many patches at a time, so
# their temporaries are (ROWS, 3d) and (ROWS, d_ff), not (N, ...): a 1344 px image is 9216
# patches, and its MLP's (N, 5120) fp32 activations alone would be 190 MB each.
ROWS = 1024


def by_rows(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over the same ROWS-row slices of `tensors`, into one preallocated output."""
    n, rows = tensors[0].shape[0], ROWS
    if n <= rows:
        return fn(*tensors)
    out = None
    for i in range(0, n, rows):
        part = fn(*(t[i : i + rows] for t in tensors))
        if out is None:
            out = part.new_empty((n, *part.shape[1:]))
        out[i : i + rows] = part
    return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_vision, 3 * cfg.d_vision, bias=True)
        self.proj = nn.Linear(cfg.d_vision, cfg.d_vision)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int],
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention within each run of `lengths` consecutive patches; plus `residual` if given."""
        N, d = x.shape
        nh = self.n_heads
        q, k, v = (x.new_empty(nh, N, d // nh) for _ in range(3))  # heads first, for SDPA
        for i in range(0, N, ROWS):
            rows = slice(i, i + ROWS)
            qi, ki, vi = self.qkv(x[rows]).reshape(-1, 3, nh, d // nh).permute(1, 2, 0, 3).unbind(0)  # (nh, r, hd)
            c, s = cos[rows], sin[rows]  # (r, hd), in fp32 as transformers rotates
            q[:, rows] = qi.float() * c + _rotate_half(qi.float()) * s
            k[:, rows] = ki.float() * c + _rotate_half(ki.float()) * s
            v[:, rows] = vi
        y = x.new_empty(N, d)
        start = 0
        for n in lengths:
            run = slice(start, start + n)
            # 4-D: with 3-D inputs SDPA on CPU takes its math path, (nh, n, n) scores and all
            out = F.scaled_dot_product_attention(q[None, :, run], k[None, :, run], v[None, :, run])[0]
            y[run] = out.transpose(0, 1).reshape(n, d)
            start += n
        del q, k, v
        if residual is None:
            return by_rows(self.proj, y)
        return by_rows(lambda r, t: r + self.proj(t), residual, y)


def vision_norm(cfg: Qwen2VisionConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.d_vision, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)


def vision_mlp(cfg: Qwen2VisionConfig) -> nn.Module:
    """fc1 -> act -> fc2, or the decoder's SwiGLU block (gate_proj, up_proj, down_proj),
    with biases, at the tower's width."""
    if not cfg.gated_mlp:
        return VisionMLP(cfg)
    return MLP(TextConfig(d_model=cfg.d_vision, d_ff=cfg.d_ff, mlp_bias=True, activation=cfg.activation))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        self.norm1 = vision_norm(cfg)
        self.norm2 = vision_norm(cfg)
        self.attn = VisionAttention(cfg)
        self.mlp = vision_mlp(cfg)

    def forward(self, x, cos, sin, lengths):
        x = self.attn(self.norm1(x), cos, sin, lengths, residual=x)
        return by_rows(lambda t: t + self.mlp(self.norm2(t)), x)


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
        c = self.cfg
        x = self.patch_embed(patches)
        cos, sin = self.rotary(vision_positions(grids, c.spatial_merge_size, x.device))
        images = [h * w for t, h, w in grids for _ in range(t)]  # one run per frame of each image
        if not c.window_size:
            for block in self.blocks:
                x = block(x, cos, sin, images)
            return x
        unit = c.spatial_merge_size**2
        order, windows = window_order(grids, c.spatial_merge_size, c.window_size // c.patch_size // c.spatial_merge_size)
        order = order.to(x.device)
        x, cos, sin = (permute_blocks(t, order, unit) for t in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, images if i in c.fullatt_block_indexes else windows)
        return permute_blocks(x, torch.argsort(order), unit)


class PatchMerger(nn.Module):
    """transformers' PatchMerger: ln_q, then mlp.0 -> GELU -> mlp.2 over each 2x2 block
    (ln_q: LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL, both at eps 1e-6)."""

    def __init__(self, cfg: Qwen2VisionConfig):
        super().__init__()
        merged = cfg.d_vision * cfg.spatial_merge_size**2
        self.merged = merged
        self.ln_q = RMSNorm(cfg.d_vision, 1e-6) if cfg.norm == "rms" else nn.LayerNorm(cfg.d_vision, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))
