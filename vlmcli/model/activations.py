"""Activation functions by the names Hugging Face configs use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.errors import UnsupportedModelError


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # CLIP's approximation of GELU; using exact GELU instead shifts every feature.
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": _quick_gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        if not isinstance(name, str) or name not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation '{name}' is not supported (supported: {', '.join(sorted(_ACTIVATIONS))})"
            )
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def activation(name: str) -> Activation:
    return Activation(name)
