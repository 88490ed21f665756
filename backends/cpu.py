"""fp32 on the CPU: the reference backend every other one is compared with."""

from __future__ import annotations

import torch
from torch import nn

from backends.base import dense_linear


class CpuBackend:
    name = "cpu"
    description = "fp32 on the CPU"

    device = torch.device("cpu")
    dtype = torch.float32

    def unavailable_reason(self) -> str | None:
        return None

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def make_linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return dense_linear(self.place(name, weight), None if bias is None else self.place(name, bias))
