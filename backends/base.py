"""What a backend is: where tensors live, in which dtype, and how a Linear layer is built.

Everything else (preprocessing, sequence construction, the model graph, sampling) is shared
by all backends, so a fix there is a fix everywhere. The loader builds the model on the
`meta` device and hands each tensor to the backend as it streams out of the checkpoint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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

    @property
    def attention_dtype(self) -> torch.dtype | None:
        """What the decoder's attention computes in; None: the activations' dtype."""
        ...

    def unavailable_reason(self) -> str | None:
        """None when this backend can run here, else why not (shown to the user)."""
        ...

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A non-Linear tensor (embedding, norm, conv) on the device in the backend's dtype."""
        ...

    def make_linear(
        self, name: str, weight: LinearWeight, bias: torch.Tensor | None, keep_dense: bool | None = None
    ) -> nn.Module:
        """The module that computes `x @ weight.T + bias` for the layer called `name`,
        from the checkpoint's tensors (still in their stored dtype, on the CPU). A
        QuantizedWeight is kept as it is by a backend of its format, dequantized by others.
        keep_dense: the model family says this layer stays unquantized by default (only
        quantizing backends look at it)."""
        ...

    def linear_bytes(self, name: str, out_features: int, in_features: int, stored: str = "dense") -> int:
        """Memory the weight of layer `name` would take here, given how the checkpoint stores
        it ("dense", "int8", "nf4", "fp4"); for `vlm info`."""
        ...

    # Whether the loader hands this backend each block's q/k/v and gate/up as one weight
    # (concatenated from the stored tensors) rather than layer by layer.
    fuses_projections: bool

    def tied_head(self, embedding: torch.Tensor) -> nn.Module | None:
        """lm_head for a model whose lm_head is its embedding matrix: None to share the
        matrix (the loader builds one plain layer the embedding reads), else a layer of its
        own (a backend that quantizes lm_head)."""
        ...


class TransposedLinear(nn.Module):
    """`x @ weight.T + bias` with the weight stored transposed: (in_features, out_features),
    contiguous. `weight` is still there, as a (out, in) view of that storage.

    Why: batch-1 decoding is a matrix-vector product per layer, and on the CPU MKL's fp32
    product reads a weight laid out this way much faster when the layer has at least as many
    outputs as inputs. Measured on a 2-core AVX2 machine (torch 2.13, MKL 2024.2), ms per
    product, stored (out, in) -> stored (in, out):
        896 x 896    0.175 -> 0.155     (q_proj, o_proj of a 0.5B Qwen2)
        4864 x 896   1.012 -> 0.553     (gate_proj, up_proj)
        151936 x 896 33.0  -> 23.1      (lm_head)
        896 x 4864   0.662 -> 0.894     (down_proj: here the usual layout wins)
    Products over many rows (prefill, the vision tower) run at the same speed either way.
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prefers_transposed(shape: torch.Size | tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a weight's matrix-vector products run faster stored transposed (see
    TransposedLinear): fp32 on the CPU, with out_features >= in_features."""
    out_f, in_f = shape
    return device.type == "cpu" and dtype == torch.float32 and out_f >= in_f


def dense_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A Linear layer of `weight` (any float dtype, any device) and `bias` (placed already)
    on `device` in `dtype` (default: the weight's), in the layout that decodes fastest
    there. Converting and transposing is one copy, so a load holds one extra layer at most."""
    device = weight.device if device is None else torch.device(device)
    dtype = weight.dtype if dtype is None else dtype
    out_f, in_f = weight.shape
    if prefers_transposed(weight.shape, device, dtype):
        weight_t = torch.empty((in_f, out_f), dtype=dtype, device=device)
        weight_t.copy_(weight.t())
        return TransposedLinear(weight_t, bias)
    with torch.device("meta"):
        layer = nn.Linear(in_f, out_f, bias=bias is not None)
    layer.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
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
    attention_dtype: torch.dtype | None = None
    fuses_projections = True  # plain weights: one product per fused group

    def unavailable_reason(self) -> str | None:
        return None

    def tied_head(self, embedding: torch.Tensor) -> nn.Module | None:
        return None

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def make_linear(
        self, name: str, weight: LinearWeight, bias: torch.Tensor | None, keep_dense: bool | None = None
    ) -> nn.Module:
        if isinstance(weight, QuantizedWeight):
            from backends.bnb import dequantize  # imports bitsandbytes: only for such checkpoints

            weight = dequantize(weight)
        return dense_linear(weight, None if bias is None else self.place(name, bias), self.device, self.dtype)

    def linear_bytes(self, name: str, out_features: int, in_features: int, stored: str = "dense") -> int:
        return out_features * in_features * self.dtype.itemsize


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_malloc_trim = _load_malloc_trim()


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS, after work on the CPU that made and freed
    temporaries the size of a layer (quantizing one, fusing several).

    glibc serves blocks under 32 MB from its heap and keeps them when they are freed,
    scattered between the tensors that stay; without this, a load's resident memory ends up
    to 2x the model (measured: 3.4 GB instead of 1.7 GB for benchmarks/load_memory.py's
    int4), varying from run to run."""
    if _malloc_trim is not None:
        _malloc_trim(0)
