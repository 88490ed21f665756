"""An NVIDIA GPU: fp16, or bf16 where the GPU has it (compute capability 8.0 and up)."""

from __future__ import annotations

import torch

from backends.base import DenseBackend


def cuda_unavailable_reason() -> str | None:
    """None when PyTorch sees a CUDA GPU, else why it does not."""
    if torch.version.cuda is None and torch.version.hip is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


class CudaBackend(DenseBackend):
    name = "cuda"
    description = "fp16 on the GPU"
    dtype = torch.float16

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    def unavailable_reason(self) -> str | None:
        return cuda_unavailable_reason()


class CudaBf16Backend(CudaBackend):
    name = "cuda-bf16"
    description = "bf16 on the GPU"
    dtype = torch.bfloat16

    def unavailable_reason(self) -> str | None:
        reason = cuda_unavailable_reason()
        if reason:
            return reason
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            major, minor = torch.cuda.get_device_capability()
            return (
                f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}) has no native "
                "bf16; use cuda (fp16)"
            )
        return None
