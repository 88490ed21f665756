"""The CPU: fp32 (the reference backend every other one is compared with), or bf16.

bf16 halves the bytes a decode step reads, and recent x86 CPUs (AVX-512 BF16, AMX) have
native bf16 dot products. fp16 is refused: PyTorch's CPU float16 matmuls are slow
everywhere and fp16's narrow range overflows in activations that bf16 keeps.
"""

from __future__ import annotations

import torch

from backends.base import DenseBackend


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


class CpuFp16Backend(DenseBackend):
    """Registered only to say why not: `-b cpu-fp16` gets a reason, not 'unknown backend'."""

    name = "cpu-fp16"
    description = "fp16 on the CPU (not supported)"
    device = torch.device("cpu")
    dtype = torch.float16

    def unavailable_reason(self) -> str | None:
        return "fp16 on the CPU is slow and overflows easily; use cpu (fp32) or cpu-bf16"
