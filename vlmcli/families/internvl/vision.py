"""InternViT, the vision tower of InternVL, as transformers' InternVLVisionModel computes it.

    pixels (B, 3, 448, 448)
      -> patch embedding: a conv (with bias) of kernel = stride = patch_size      (B, P, d)
      -> prepend the learned [CLS] token, add the absolute position embeddings   (B, 1+P, d)
      -> n blocks, each
            x = x + lambda_1 * attn(norm_before(x))      attention: q/k/v (optional bias),
            x = x + lambda_2 * mlp(norm_after(x))        optional RMS QK-norm over the whole
                                                         width, `projection_layer` out
         norms: LayerNorm or RMSNorm (norm_type)
      -> (use_mean_pooling false only) a final LayerNorm on the last block's output

Parameter names are transformers' (`embeddings.patch_embeddings.projection`,
`encoder.layer.N.attention.q_proj`, `layernorm_before`, `lambda_1` ...), so checkpoint names
map by prefix alone. Like the shared tower (vlmcli/model/vision.py) it runs no block past
the deepest feature layer used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.families.internvl.config import InternVisionConfig
from vlmcli.model.vision import VisionMLP
from vlmcli.model.decoder import RMSNorm  # x / rms(x) * w in fp32, as InternVLVisionRMSNorm


def _norm(cfg: InternVisionConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.d_vision, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.d_vision, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixels.to(self.projection.weight.dtype))  # (B, d, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, P, d)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.d_vision))
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = (
            nn.Parameter(torch.empty(1, cfg.num_positions(), cfg.d_vision)) if cfg.absolute_positions else None
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+P, d)
        if self.position_embeddings is not None:
            if x.shape[1] != self.position_embeddings.shape[1]:
                # transformers would interpolate; every tile here has the tower's own size
                raise ValueError(
                    f"image gives {x.shape[1]} positions, the vision tower has {self.position_embeddings.shape[1]}"
                )
            x = x + self.position_embeddings
        return x


class InternVisionAttention(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        d = cfg.d_vision
        self.n_heads = cfg.n_heads
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, d, bias=cfg.attention_bias)
        self.projection_layer = nn.Linear(d, d)
        # the RMSNorm's eps is its class default, not the config's layer_norm_eps
        self.q_norm = RMSNorm(d, 1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, 1e-6) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)

        q = heads(self.q_norm(self.q_proj(x)))
        k = heads(self.k_norm(self.k_proj(x)))
        v = heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # bidirectional
        return self.projection_layer(y.transpose(1, 2).reshape(B, T, d))


class InternVisionLayer(nn.Module):
    def __init__(self, cfg: InternVisionConfig):
        super().__init__()
        self.attention = InternVisionAttention(cfg)
        self.mlp = VisionMLP(cfg)  # fc1 -> act -> fc2, as CLIP's
        self.layernorm_before = _norm(cfg)
        self.layernorm_after = _norm(cfg)
        self.lambda_1 = nn.Parameter(torch.empty(cfg.d_vision))  # layer scale
        self.lambda_2 = nn.Parameter(torch.empty(cfg.d_vision))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lambda_1 * self.attention(self.layernorm_before(x)) + x
        return self.lambda_2 * self.mlp(self.layernorm_after(x)) + x


class InternVisionModel(nn.Module):
    def __init__(self, cfg: InternVisionConfig, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(InternVisionLayer(cfg) for _ in range(n_layers))
        # transformers' final `layernorm`, an Identity under use_mean_pooling (InternVL3)
        self.layernorm = None if cfg.mean_pooling else nn.LayerNorm(cfg.d_vision, eps=cfg.norm_eps)

    def forward(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """The hidden state transformers' InternVLModel selects: for layer -1 its
        last_hidden_state (after the final layernorm when there is one), else
        hidden_states[layer] (0 = embeddings, i = after block i)."""
        total = self.cfg.n_layers + 1
        wanted = layer % total
        if wanted > len(self.encoder.layer):
            raise ValueError(f"feature layer {layer} needs {wanted} blocks; {len(self.encoder.layer)} were built")
        x = self.embeddings(pixels)
        for block in self.encoder.layer[:wanted]:
            x = block(x)
        if layer == -1 and self.layernorm is not None:
            x = self.layernorm(x)
        return x
