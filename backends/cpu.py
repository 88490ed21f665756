"""The CPU: fp32 (the reference backend every other one is compared with), or bf16.

bf16 halves the bytes a decode step reads, and recent x86 CPUs (AVX-512 BF16, AMX) have
native bf16 dot products. fp16 is refused: PyTorch's CPU float16 matmuls are slow
everywhere and fp16's narrow range overflows in activations that bf16 keeps.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from backends.base import DenseBackend, LinearWeight

# Up to this many rows a bf16 product runs as bf16 (a decode step: it reads half the bytes
# of fp32); past it, in fp32 on CPUs without fast bf16 (see UpcastLinear). Measured on a
# 2-core AVX2 machine, 4864 x 896 weight: 4 rows 1.7 ms bf16 / 2.4 ms fp32, 16 rows 6.8 / 3.6.
_BF16_MAX_ROWS = 8


@lru_cache(maxsize=1)
def fast_bf16_matmul() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or newer): without them a bf16
    matrix product is emulated, and over many rows it is several times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class UpcastLinear(nn.Module):
    """A bf16 Linear whose products over many rows (prefill, the vision tower) run in fp32.

    The weights stay bf16 (half the memory, half the bytes per decode step); a wide product
    converts them for the call. On a CPU without bf16 instructions that is ~8x faster than
    the emulated bf16 product (4864 x 896 weight, 750 rows: 320 ms bf16, 41 ms via fp32) and
    rounds the same way up to the order of the sums (the product is rounded to bf16 either way).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= _BF16_MAX_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CpuBackend(DenseBackend):
    name = "cpu"
    description = "fp32 on the CPU"
    device = torch.device("cpu")
    dtype = torch.float32


class CpuBf16Backend(DenseBackend):
    name = "cpu-bf16"
    description = "bf16 on the CPU"
    device = torch.device("cpu")
    dtype = torch.bfloat16

    @property
    def attention_dtype(self) -> torch.dtype | None:
        """fp32 without bf16 kernels: the emulated bf16 attention of one new token over a
        cached sequence is ~5x slower (780 keys, 14 heads: 0.69 ms bf16, 0.13 ms converting
        to fp32 and back); the result differs by bf16 rounding."""
        return None if fast_bf16_matmul() else torch.float32

    def make_linear(
        self, name: str, weight: LinearWeight, bias: torch.Tensor | None, keep_dense: bool | None = None
    ) -> nn.Module:
        layer = super().make_linear(name, weight, bias)
        if fast_bf16_matmul():
            return layer
        return UpcastLinear(layer.weight, layer.bias)


class CpuFp16Backend(DenseBackend):
    """Registered only to say why not: `-b cpu-fp16` gets a reason, not 'unknown backend'."""

    name = "cpu-fp16"
    description = "fp16 on the CPU (not supported)"
    device = torch.device("cpu")
    dtype = torch.float16

    def unavailable_reason(self) -> str | None:
        return "fp16 on the CPU is slow and overflows easily; use cpu (fp32) or cpu-bf16"
