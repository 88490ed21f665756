"""The backend registry: `-b NAME[:OPTIONS]` -> a Backend, and what `auto` picks.

    auto       a quantized checkpoint in its own format (int8 / int4, or q8 / q4 for one
               `vlm convert --to q8|q4` wrote); otherwise fp16 on the GPU when there is
               one, else fp32 on the CPU
    cpu        fp32 on the CPU              cpu-bf16   bf16 on the CPU
    cuda       fp16 on the GPU              bf16       bf16 on the GPU (alias: cuda-bf16)
    int8       bitsandbytes LLM.int8        options: threshold=T (default 6), all, device=cpu|cuda
    int4       bitsandbytes 4-bit           options: nf4 (default) | fp4, dq, all, device=cpu|cuda
    q8         int8 weights on the CPU      options: lm_head, all   (PyTorch's int8 kernel)
    q4         int4 weights on the CPU      options: group=32|64|128|256 (default 32), lm_head, all

Options follow a colon, separated by commas: `-b int4:fp4,dq`, `-b int8:threshold=4`.
`dq` is double quantization (the per-block scales quantized too, ~0.4 bit less per weight);
`all` also quantizes the vision tower, projector and lm_head. The bitsandbytes backends run
on the GPU when there is one, else on the CPU (slowly: it is for checking, not for speed).
q8 and q4 are the fast CPU ones (backends/weight_only.py): weight-only int8 per channel and
int4 in groups, quantized while loading; `lm_head` quantizes lm_head too (a small model's
largest product), `all` everything.

A backend that cannot run here (no GPU, no bf16 on this GPU, no bitsandbytes, fp16 on the
CPU) is refused with the reason before anything is read or downloaded.
"""

from __future__ import annotations

import torch

from backends.base import Backend
from backends.bnb import BnbBackend, Int4Backend, Int8Backend, bnb_unavailable_reason, from_options
from backends.cpu import CpuBackend, CpuBf16Backend, CpuFp16Backend
from backends.cuda import CudaBackend, CudaBf16Backend
from backends.weight_only import Q4Backend, Q8Backend, WeightOnlyBackend
from backends.weight_only import from_options as weight_only_from_options
from backends.weight_only import other_backend_refusal
from vlmcli.errors import UsageError
from vlmcli.quantization import Quantization

_DENSE: dict[str, type] = {
    cls.name: cls for cls in (CpuBackend, CpuBf16Backend, CpuFp16Backend, CudaBackend, CudaBf16Backend)
}
_BNB: dict[str, type[BnbBackend]] = {Int8Backend.name: Int8Backend, Int4Backend.name: Int4Backend}
_WEIGHT_ONLY: dict[str, type[WeightOnlyBackend]] = {Q8Backend.name: Q8Backend, Q4Backend.name: Q4Backend}
_ALIASES = {"bf16": "cuda-bf16", "fp16": "cuda"}
# What help and error messages list (cpu-fp16 and the aliases work but are not advertised).
LISTED = ("auto", "cpu", "cpu-bf16", "cuda", "bf16", "int8", "int4", "q8", "q4")


def names() -> list[str]:
    return list(LISTED)


def parse_spec(spec: str) -> tuple[str, dict[str, str | None]]:
    """'int4:fp4,dq' -> ('int4', {'fp4': None, 'dq': None}); 'int8:threshold=4' -> ('int8', {'threshold': '4'})."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    options: dict[str, str | None] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        options[key.strip().lower()] = value.strip() if eq else None
    return _ALIASES.get(name, name), options


def build(spec: str, checkpoint: Quantization | None = None) -> Backend:
    """The backend `spec` names, not yet checked to be usable here (`vlm info` estimates
    memory for backends this machine lacks). UsageError for unknown names and options.

    `checkpoint` is the quantization of the checkpoint about to be loaded, when known: `auto`
    then picks its format, and a quantized backend of another format is refused."""
    name, options = parse_spec(spec)
    if name == "auto":
        if options:
            raise UsageError("backend 'auto' takes no options")
        return _auto(checkpoint)
    if name in _BNB:
        if checkpoint is not None and not checkpoint.bitsandbytes:
            raise other_backend_refusal(checkpoint)
        return from_options(_BNB[name], options, checkpoint)
    if name in _WEIGHT_ONLY:
        return weight_only_from_options(_WEIGHT_ONLY[name], options, checkpoint)
    if name in _DENSE:
        if options:
            raise UsageError(f"backend '{name}' takes no options")
        return _DENSE[name]()
    raise UsageError(f"unknown backend '{spec}' (choose from: {', '.join(names())})")


def get_backend(spec: str, checkpoint: Quantization | None = None) -> Backend:
    """The backend `spec` asks for, checked to be usable here (else a UsageError saying why)."""
    name, _ = parse_spec(spec)
    backend = build(spec, checkpoint)
    reason = backend.unavailable_reason()
    if reason:
        if name == "auto":  # only a quantized checkpoint makes auto need anything
            raise UsageError(f"this checkpoint is {checkpoint.describe()}: {reason}")
        raise UsageError(f"backend '{spec}' is not available: {reason}")
    if checkpoint is not None and checkpoint.bitsandbytes and not isinstance(backend, BnbBackend):
        reason = bnb_unavailable_reason()  # dequantizing a bitsandbytes checkpoint needs it too
        if reason:
            raise UsageError(f"this checkpoint is {checkpoint.describe()}: {reason}")
    return backend


def _auto(checkpoint: Quantization | None) -> Backend:
    if checkpoint is not None and not checkpoint.bitsandbytes:
        return weight_only_from_options(_WEIGHT_ONLY[checkpoint.method], {}, checkpoint)
    if checkpoint is not None:
        return from_options(Int8Backend if checkpoint.method == "int8" else Int4Backend, {}, checkpoint)
    if torch.cuda.is_available():
        return CudaBackend()
    return CpuBackend()
