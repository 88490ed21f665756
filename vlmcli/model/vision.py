"""The vision encoder: a ViT that turns pixels into one feature vector per patch.

CLIP ViT (LLaVA-1.5: ViT-L/14 at 336 px, 576 patches):
    pixels (B, 3, H, W)
      -> patch embedding: a conv with kernel = stride = patch_size  (B, P, d)
      -> prepend the learned [CLS] token, add position embeddings   (B, 1+P, d)
      -> pre-layernorm
      -> n pre-LN transformer blocks (attention + QuickGELU MLP)
SigLIP (llava-interleave, LLaVA-OneVision: so400m/14 at 384 px, 729 patches) is the same
stack without the [CLS] token and without the pre-layernorm, with GELU-tanh in its MLPs and
a bias on the patch-embedding conv.

A LLaVA takes the hidden states of one or more blocks (not the final pooled output), so
the encoder returns the ones asked for and never runs blocks past the deepest of them.
LLaVA uses neither tower's post_layernorm nor SigLIP's attention-pooling head: transformers
selects `hidden_states[i]`, which for both towers is the raw output of block i. PaliGemma
takes SigLIP's `last_hidden_state` instead, the last block's output after post_layernorm
(`post_layernorm=True`: the final hidden state is normalised, the others stay raw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.config import VisionConfig
from vlmcli.model.activations import activation
from vlmcli.model.embedding import Embedding


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.d_vision)) if cfg.class_token else None
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.d_vision, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
        )
        self.position_embedding = Embedding(cfg.num_positions(), cfg.d_vision)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, d, h, w)
        x = patches.flatten(2).transpose(1, 2)  # (B, P, d)
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1+P, d)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"image gives {x.shape[1]} positions, the vision tower has "
                f"{self.position_embedding.num_embeddings}"
            )
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        d = cfg.d_vision
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.activation)
        self.fc1 = nn.Linear(cfg.d_vision, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_vision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """Parameter names follow the checkpoints' (`embeddings`, `pre_layrnorm`, `encoder.layers`)
    so the loader maps names by prefix alone."""

    def __init__(self, cfg: VisionConfig, n_layers: int, post_layernorm: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # (CLIP's spelling, kept so checkpoint names map by prefix)
        self.pre_layrnorm = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps) if cfg.pre_layernorm else nn.Identity()
        # Only the blocks up to the deepest selected feature layer are built (LLaVA-1.5
        # uses layer -2, so the last block of ViT-L is never loaded or run).
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(n_layers))
        self.post_layernorm = nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps) if post_layernorm else None

    def forward(self, pixels: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Hidden states at `layers` (0 = embeddings, i = after block i; negative from the end
        of the full tower, as in the checkpoint's config)."""
        total = self.cfg.n_layers + 1
        wanted = [i % total for i in layers]
        x = self.pre_layrnorm(self.embeddings(pixels))
        states = {0: x} if 0 in wanted else {}
        for i, block in enumerate(self.encoder.layers, start=1):
            x = block(x)
            if i in wanted:
                states[i] = x
        last = self.cfg.n_layers
        if self.post_layernorm is not None and last in states:
            states[last] = self.post_layernorm(states[last])
        return [states[i] for i in wanted]
