"""The projection: vision features (d_vision) -> the decoder's embedding space (d_language).

LLaVA (v1) used a single linear layer; LLaVA-1.5 a 2-layer MLP with GELU between. The
parameter names (`linear_1`, `linear_2`) follow llava-hf checkpoints; the linear variant
has `linear_1` only.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmcli.config import ProjectionConfig
from vlmcli.model.activations import activation


class Projector(nn.Module):
    def __init__(self, cfg: ProjectionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.projection_type == "linear":
            self.linear_1 = nn.Linear(cfg.d_vision, cfg.d_language, bias=cfg.bias)
        elif cfg.projection_type == "mlp":
            self.linear_1 = nn.Linear(cfg.d_vision, cfg.hidden, bias=cfg.bias)
            self.act = activation(cfg.activation)
            self.linear_2 = nn.Linear(cfg.hidden, cfg.d_language, bias=cfg.bias)
        else:
            raise ValueError(f"unknown projection type {cfg.projection_type!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (N, T, d_vision) -> (N, T, d_lang)
        x = self.linear_1(features)
        if self.cfg.projection_type == "mlp":
            x = self.linear_2(self.act(x))
        return x
