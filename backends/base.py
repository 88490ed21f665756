"""What a backend is: where tensors live, in which dtype, and how a Linear layer is built.

Everything else (preprocessing, sequence construction, the model graph, sampling) is shared
by all backends, so a fix there is a fix everywhere. The loader builds the model on the
`meta` device and hands each tensor to the backend as it streams out of the checkpoint.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backend(Protocol):
    name: str  # what `-b` takes
    description: str  # one line for --help and `vlm info`

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """dtype of activations and of every tensor the backend does not quantize."""
        ...

    def unavailable_reason(self) -> str | None:
        """None when this backend can run here, else why not (shown to the user)."""
        ...

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A non-Linear tensor (embedding, norm, conv) on the device in the backend's dtype."""
        ...

    def make_linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """The module that computes `x @ weight.T + bias` for the layer called `name`,
        from the checkpoint's tensors (still in their stored dtype, on the CPU)."""
        ...


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear around existing tensors, without allocating and then overwriting."""
    out_f, in_f = weight.shape
    with torch.device("meta"):
        layer = nn.Linear(in_f, out_f, bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer
