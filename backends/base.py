"""What a backend is: where tensors live, in which dtype, and how a Linear layer is built.

Everything else (preprocessing, sequence construction, the model graph, sampling) is shared
by all backends, so a fix there is a fix everywhere. The loader builds the model on the
`meta` device and hands each tensor to the backend as it streams out of the checkpoint.
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

import torch
from torch import nn

from vlmcli.quantization import QuantizedWeight

# What the loader hands to make_linear: a plain weight, or one a bitsandbytes checkpoint
# stores already quantized (packed codes plus their quantization state).
LinearWeight = Union[torch.Tensor, QuantizedWeight]


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

    def make_linear(self, name: str, weight: LinearWeight, bias: torch.Tensor | None) -> nn.Module:
        """The module that computes `x @ weight.T + bias` for the layer called `name`,
        from the checkpoint's tensors (still in their stored dtype, on the CPU). A
        QuantizedWeight is kept as it is by a backend of its format, dequantized by others."""
        ...

    def linear_bytes(self, name: str, out_features: int, in_features: int, stored: str = "dense") -> int:
        """Memory the weight of layer `name` would take here, given how the checkpoint stores
        it ("dense", "int8", "nf4", "fp4"); for `vlm info`."""
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


class DenseBackend:
    """A backend that keeps every weight as a plain tensor of one dtype on one device.

    A quantized checkpoint still loads: each quantized layer is dequantized as it arrives
    (which needs bitsandbytes for the 4-bit formats)."""

    name: str
    description: str
    device: torch.device
    dtype: torch.dtype

    def unavailable_reason(self) -> str | None:
        return None

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def make_linear(self, name: str, weight: LinearWeight, bias: torch.Tensor | None) -> nn.Module:
        if isinstance(weight, QuantizedWeight):
            from backends.bnb import dequantize  # imports bitsandbytes: only for such checkpoints

            weight = dequantize(weight)
        return dense_linear(self.place(name, weight), None if bias is None else self.place(name, bias))

    def linear_bytes(self, name: str, out_features: int, in_features: int, stored: str = "dense") -> int:
        return out_features * in_features * self.dtype.itemsize
