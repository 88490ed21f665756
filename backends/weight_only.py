"""q8 and q4: weight-only quantized CPU backends on PyTorch's own int8 / int4 kernels.

Batch-1 decoding reads every weight once per token, so a step costs what its weights weigh.
These backends quantize the decoder's Linear layers while loading, one layer at a time
(never a full-precision copy of the model beside the quantized one), and compute each
product with the kernels PyTorch ships for exactly this (what torchao's CPU int4/int8
weight-only layouts call underneath, without its tensor-subclass dispatch per call):

    q8  per-channel symmetric int8: one bf16 scale per output row, w = q * scale
        (q in -127..127); torch._weight_int8pack_mm
    q4  groupwise asymmetric int4 along the input dimension: per group of `group` weights
        of a row a bf16 scale and a bf16 offset, w = (q - 8) * scale + zero (q in 0..15);
        torch._weight_int4pack_mm_for_cpu over the codes packed two per byte by
        torch._convert_weight_to_int4pack_for_cpu

Both kernels compute in bf16: each product's input is rounded to bf16 and its output comes
back as bf16, then returns to fp32, the dtype of everything else (norms, attention, the
residual stream). With fp32 inputs the same kernels take a generic path that is ~20-60x
slower (AMD EPYC 9004-class, AVX-512, 2 threads, torch 2.13, batch-1, fastest of 15 sweeps,
ms per product; benchmarks/weight_only_kernels.py measures a whole step):
                           int8 fp32-in  int8 bf16-in  int4/64 fp32-in  int4/64 bf16-in
    960 x 576  (q|k|v)        8.0          0.089           1.47            0.026
    3072 x 576 (gate|up)      3.0          0.179           1.70            0.067
    576 x 1536 (down)         4.5          0.083           9.7             0.037
    49152 x 576 (lm_head)    68            16              56              1.04
(fp32 dense for 1536 x 576: 0.15 ms.) Over many rows (prefill: 800 rows) both kernels run
about as fast as the fp32 product, so one path serves prefill and decoding.

Which layers: as for int8/int4 (backends/bnb.py), the decoder's blocks are quantized, the
vision tower, projector and lm_head stay fp32, unless asked: `lm_head` quantizes lm_head too
(it is the largest single product of a small model: SmolLM2-135M's 49152 x 576 head is a
third of a step's weight bytes), `all` everything. q/k/v and gate/up arrive fused from the
loader (one product each; quantizing per output row or per group of a row is the same
whether the rows are fused or not, so fusing changes no value, only the call count). Fused
is faster: SmolLM2's q, k, v as three q4 products 633 us, as one 417 us; gate, up 1567 us
vs 1150 us (q8: 625 / 330, 1122 / 957; 1 thread, best of 15 sweeps, on a machine busy
with other work, so slower than the table above, but both sides alike).

Shapes the kernels take: the int4 packer needs out_features divisible by 16 and the kernel
in_features divisible by the group size (32, 64, 128 or 256); the int8 kernel in_features
divisible by 16 (INT8_IN_MULTIPLE: 32 is asked). int4 rows are padded with zero rows to a
multiple of 16 (a vocabulary of 49153 rows: one padded block, the output sliced), so only
in_features can send a layer to fp32, with one notice on stderr for the first such layer.

Stored: `vlm convert --to q8|q4` writes these codes and scales as plain tensors (int8 codes;
int4 codes two per byte, scales and offsets per row; the layout and why it is not torchao's
are in vlmcli/quantization.py), and -b q8 / -b q4 (or auto) build the same layers from them
without quantizing: the kernel's packing (rows padded, _convert_weight_to_int4pack_for_cpu)
happens while loading, as it does after quantizing.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from backends.base import LinearWeight, dense_linear, release_freed_memory
from vlmcli.errors import CheckpointError, UsageError
from vlmcli.quantization import Quantization, QuantizedWeight, quantized_by_default

COMPUTE_DTYPE = torch.bfloat16  # what both kernels take and give (see the module docstring)
INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
INT4_ROW_BLOCK = 16  # _convert_weight_to_int4pack_for_cpu: out_features a multiple of this
# _weight_int8pack_mm raises nothing for other shapes but reads past each row: measured on
# AVX-512, in_features 24, 40, 100 give wrong products, 31, 33, 37 crash the process; 16, 48,
# 80, 112, 144 are right. 32 also covers the narrower AVX2 vectors and AMX's 32-wide bf16 tiles.
INT8_IN_MULTIPLE = 32
# The default group size: 32, llama.cpp's Q4_1 layout (min and step per 32 weights, 5 bits
# per weight with the bf16 pair; 64 takes 4.5). SmolLM2-135M as shipped (its GGUF is Q4_1,
# the weights on a 32-wide 4-bit grid), lm_head fp32, logits over question + answer against
# fp32 (tests/test_weight_only.py): group 32 mean KL 0.003 nats, top-1 0.98; group 64: 0.66,
# 0.63 (bitsandbytes nf4 in blocks of 64: 1.23). A decode step costs the same either way
# (benchmarks/weight_only_kernels.py: the int4 kernel streams the codes, the pairs are small).
DEFAULT_GROUP = 32


def _notice(message: str) -> None:
    """A notice on stderr: through the CLI's console when `vlm` is running (dim, silenced by
    -q), else as a plain line (as backends/bnb.py does)."""
    console = sys.modules.get("vlmcli.cli.console")
    if console is not None:
        console.notice(message)
    else:
        print(message, file=sys.stderr)


# ---- quantizing single weights ---------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (codes int8 (out, in), scales bf16 (out,)), w ~ codes * scales.

    The codes are rounded against the bf16 scales the kernel will use, so the only error is
    the rounding to a code (at most half a step per weight)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1).clamp(min=1e-12)  # an all-zero row: any scale gives codes 0
    scales = (absmax / 127).to(COMPUTE_DTYPE)
    codes = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (codes int32 (out, in) in 0..15, scale_zeros bf16 (in // group, out, 2)),
    w ~ (codes - 8) * scale + zero per group of `group` inputs of a row (the layout the CPU
    int4 kernel takes: [..., 0] the scales, [..., 1] the offsets).

    Each group's range [min, max] is split into 15 steps; the codes are rounded against
    the bf16 scale and offset the kernel will use."""
    out_f, in_f = weight.shape
    w = weight.float().reshape(out_f, in_f // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(COMPUTE_DTYPE)  # a constant group: any scale
    zeros = (lo + 8 * scales.float()).to(COMPUTE_DTYPE)
    codes = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp_(0, 15)
    codes = codes.to(torch.int32).reshape(out_f, in_f)
    scale_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return codes, scale_zeros


def q8_bytes(out_f: int, in_f: int) -> int:
    return out_f * in_f + 2 * out_f  # int8 codes + one bf16 scale per row


def q4_bytes(out_f: int, in_f: int, group: int) -> int:
    rows = -(-out_f // INT4_ROW_BLOCK) * INT4_ROW_BLOCK  # padded to the packer's block
    return rows * in_f // 2 + rows * (in_f // group) * 2 * 2  # codes, two per byte + bf16 scale and offset per group


# ---- the stored form (vlm convert --to q8|q4; vlmcli/quantization.py describes it) -----------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> uint8 (out, in / 2): input 2j in the low nibble of byte j,
    2j + 1 in the high one (a layout of our own, not the kernel's, which is CPU specific)."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """pack_nibbles undone: uint8 (out, in / 2) -> int32 codes (out, in)."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def stored_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight (out, in) -> the tensors a q8 checkpoint stores for it."""
    codes, scales = quantize_int8(weight)
    return {"weight": codes, "weight_scale": scales}


def stored_int4(weight: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """A weight (out, in) -> the tensors a q4 checkpoint stores for it: the codes packed two
    per byte, the scales and offsets one row per output (so layers stack by rows)."""
    codes, scale_zeros = quantize_int4(weight, group)
    return {
        "weight": pack_nibbles(codes),
        "weight_scale": scale_zeros[..., 0].t().contiguous(),
        "weight_zero": scale_zeros[..., 1].t().contiguous(),
    }


def int4_from_stored(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A q4 layer's stored tensors -> (codes int32 (out, in), scale_zeros (in / group, out, 2),
    group): what quantize_int4 returns, bit for bit."""
    scales, zeros = qw.tensors["weight_scale"], qw.tensors["weight_zero"]
    codes = unpack_nibbles(qw.tensors["weight"])
    scale_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return codes, scale_zeros, codes.shape[1] // scales.shape[1]


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """A q8 / q4 layer's stored tensors -> the float32 (out, in) weight they stand for."""
    if qw.format == "q8":
        return qw.tensors["weight"].float() * qw.tensors["weight_scale"].float()[:, None]
    codes, scale_zeros, group = int4_from_stored(qw)
    scales = scale_zeros[..., 0].float().t().repeat_interleave(group, dim=1)
    zeros = scale_zeros[..., 1].float().t().repeat_interleave(group, dim=1)
    return (codes.float() - 8) * scales + zeros


# ---- the layers ------------------------------------------------------------------------------


class _WeightOnlyLinear(nn.Module):
    """What q8 and q4 layers share: the input flattened to rows and rounded to bf16, the
    kernel's bf16 output back in the input's dtype, the bias added in that dtype."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    wide_rows: int | None = None  # past this many rows, _wide_product (None: never)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _wide_product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.wide_rows is not None and rows.shape[0] > self.wide_rows:
            y = self._wide_product(rows)
        else:
            y = self._product(rows.to(COMPUTE_DTYPE)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """int8 codes (out, in) with one bf16 scale per row, through torch._weight_int8pack_mm.

    Over many rows (a prefill) the int8 kernel is slower than dequantizing the layer for the
    call and running the fp32 product; 1 thread, 750 rows, ms: 9728 x 896 fp32 205, int8
    kernel 327, dequantize + fp32 223 (the dequantizing alone ~17: it pays from ~100 rows);
    896 x 4864: 70, 84, 72. The int4 kernel keeps up with fp32 there (180, 81) and stays."""

    wide_rows = 256

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(*codes.shape, bias)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8WeightOnlyLinear":
        return cls(*quantize_int8(weight), bias)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)

    def _wide_product(self, rows: torch.Tensor) -> torch.Tensor:
        weight = self.codes.to(rows.dtype).mul_(self.scales.to(rows.dtype)[:, None])  # one layer, for this call
        return rows @ weight.t()


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """int4 codes packed two per byte (rows padded to a multiple of 16) with a bf16 scale and
    offset per group of inputs, through torch._weight_int4pack_mm_for_cpu."""

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, group: int, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__(out_features, packed.shape[1] * 2, bias)
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> "Int4WeightOnlyLinear":
        return cls.from_codes(*quantize_int4(weight, group), group, bias)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale_zeros: torch.Tensor, group: int, bias: torch.Tensor | None
    ) -> "Int4WeightOnlyLinear":
        """The layer of quantize_int4's codes (out, in) and scale_zeros, packed for the kernel."""
        out_f, in_f = codes.shape
        pad = -out_f % INT4_ROW_BLOCK
        if pad:  # zero rows: code 8, scale and offset 0, so they compute 0 and are sliced off
            codes = torch.cat([codes, torch.full((pad, in_f), 8, dtype=codes.dtype)])
            scale_zeros = torch.cat([scale_zeros, scale_zeros.new_zeros(scale_zeros.shape[0], pad, 2)], dim=1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # (rows, in / 2) uint8
        return cls(packed, scale_zeros, group, out_f, bias)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_zeros)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group}"


# ---- the backends ----------------------------------------------------------------------------


class WeightOnlyBackend:
    """What q8 and q4 share: fp32 on the CPU for everything not quantized, which layers to
    quantize, q/k/v and gate/up fused while loading (vlmcli/loader.py reads fuses_projections)."""

    name: str
    device = torch.device("cpu")
    dtype = torch.float32
    attention_dtype = None
    fuses_projections = True  # the loader hands over q/k/v and gate/up as one weight each

    notice: Callable[[str], None] = staticmethod(_notice)

    def __init__(self, *, quantize_all: bool = False, quantize_head: bool = False, prequantized: bool = False):
        self.quantize_all = quantize_all
        self.quantize_head = quantize_head or quantize_all
        # the checkpoint is in this format (vlm convert): its quantized layers arrive as codes,
        # the others stay fp32; only a tied lm_head (stored once, as the embedding) is
        # quantized here, when the checkpoint says so (quantize_head)
        self.prequantized = prequantized
        self.kept_dense: list[str] = []  # layers the kernel cannot take (int4: in_features)

    @property
    def description(self) -> str:
        extra = ", everything quantized" if self.quantize_all else ", lm_head quantized" if self.quantize_head else ""
        stored = ", prequantized" if self.prequantized else ""
        return f"{self._what()} weight-only on the CPU (PyTorch kernels{extra}{stored})"

    def _what(self) -> str:
        raise NotImplementedError

    def unavailable_reason(self) -> str | None:
        return None

    def quantizes(self, name: str, keep_dense: bool | None = None) -> bool:
        """Whether layer `name` is quantized. keep_dense: the family's word on it (None: the
        three-stage default). A fused q/k/v or gate/up comes with its parts' word."""
        if self.prequantized:
            return False  # what the checkpoint stores unquantized stays so
        if self.quantize_all:
            return True
        if name == "decoder.lm_head":
            return self.quantize_head
        return not (not quantized_by_default(name) if keep_dense is None else keep_dense)

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def make_linear(
        self, name: str, weight: LinearWeight, bias: torch.Tensor | None, keep_dense: bool | None = None
    ) -> nn.Module:
        bias = None if bias is None else self.place(name, bias)
        if isinstance(weight, QuantizedWeight) and weight.format == self.name:
            return self._from_stored(weight, bias)
        if isinstance(weight, QuantizedWeight):  # another format's checkpoint: requantized here
            weight = _dequantize_other(weight)
        if not self.will_quantize(name, *weight.shape, keep_dense=keep_dense):
            return dense_linear(weight, bias, self.device, self.dtype)
        layer = self._quantize(weight, bias)
        release_freed_memory()  # the layer's fp32 temporaries (see release_freed_memory)
        return layer

    def will_quantize(self, name: str, out_f: int, in_f: int, keep_dense: bool | None = None) -> bool:
        """Whether a full-precision layer `name` (out_f x in_f) is quantized: the policy, then
        the kernel's shapes (a notice for the first that does not fit). `vlm convert` asks
        the same, so a q8 / q4 checkpoint quantizes exactly the layers a load would."""
        return self.quantizes(name, keep_dense) and self._fits(name, out_f, in_f)

    def stored_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint in this format stores for `weight` (`vlm convert`)."""
        raise NotImplementedError

    def _from_stored(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def tied_head(self, embedding: torch.Tensor) -> nn.Module | None:
        """lm_head of a model whose lm_head is its embedding matrix: None (the loader shares
        the fp32 matrix) unless lm_head is quantized; then its own quantized copy, and the
        embedding keeps the fp32 rows it looks up (SmolLM2-135M, q4: +14 MB beside 113 MB)."""
        if not self.quantize_head or not self._fits("decoder.lm_head", *embedding.shape):
            return None
        return self._quantize(embedding, None)

    def _fits(self, name: str, out_f: int, in_f: int) -> bool:
        """Whether the kernel can take layer `name`; the first one that cannot gets a notice."""
        if self._kernel_takes(out_f, in_f):
            return True
        if not self.kept_dense:
            self.notice(
                f"{self.name}: {name} ({out_f} x {in_f}) and any other layer whose inputs are not a multiple "
                f"of {self._in_multiple()} stay fp32; PyTorch's {self._what().split()[0]} kernel cannot take them"
            )
        self.kept_dense.append(name)
        return False

    def _kernel_takes(self, out_f: int, in_f: int) -> bool:
        return in_f > 0 and in_f % self._in_multiple() == 0

    def _in_multiple(self) -> int:
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def _bytes(self, out_f: int, in_f: int) -> int:
        raise NotImplementedError

    def linear_bytes(self, name: str, out_features: int, in_features: int, stored: str = "dense") -> int:
        if stored == self.name or (self.quantizes(name) and self._kernel_takes(out_features, in_features)):
            return self._bytes(out_features, in_features)
        return out_features * in_features * self.dtype.itemsize


def _dequantize_other(weight: QuantizedWeight) -> torch.Tensor:
    """A layer a checkpoint stores in another quantized format, as float32."""
    if weight.format in ("q8", "q4"):
        return dequantize(weight)
    from backends.bnb import dequantize as bnb_dequantize  # imports bitsandbytes: only for its checkpoints

    return bnb_dequantize(weight)


class Q8Backend(WeightOnlyBackend):
    name = "q8"

    def _what(self) -> str:
        return "int8 (per-channel)"

    def _in_multiple(self) -> int:
        return INT8_IN_MULTIPLE

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return Int8WeightOnlyLinear.quantize(weight, bias)

    def _bytes(self, out_f: int, in_f: int) -> int:
        return q8_bytes(out_f, in_f)

    def stored_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return stored_int8(weight)

    def _from_stored(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> nn.Module:
        return Int8WeightOnlyLinear(weight.tensors["weight"], weight.tensors["weight_scale"], bias)


class Q4Backend(WeightOnlyBackend):
    name = "q4"

    def __init__(self, *, group: int = DEFAULT_GROUP, **kwargs: Any):
        super().__init__(**kwargs)
        if group not in INT4_GROUPS:
            raise UsageError(f"q4 group size must be one of {', '.join(map(str, INT4_GROUPS))}, not {group}")
        self.group = group

    def _what(self) -> str:
        return f"int4 (groups of {self.group})"

    def _in_multiple(self) -> int:
        return self.group  # a multiple of 32 too (INT4_GROUPS)

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return Int4WeightOnlyLinear.quantize(weight, bias, self.group)

    def _bytes(self, out_f: int, in_f: int) -> int:
        return q4_bytes(out_f, in_f, self.group)

    def stored_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return stored_int4(weight, self.group)

    def _from_stored(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> nn.Module:
        codes, scale_zeros, group = int4_from_stored(weight)
        if group != self.group:
            raise CheckpointError(
                f"layer '{weight.name}' is stored in groups of {group}, config.json says {self.group}"
            )
        return Int4WeightOnlyLinear.from_codes(codes, scale_zeros, group, bias)


def from_options(
    cls: type[WeightOnlyBackend], options: dict[str, str | None], checkpoint: Quantization | None = None
) -> WeightOnlyBackend:
    """`-b q8:lm_head`, `-b q4:group=32,all` -> a backend. A checkpoint in this format (vlm
    convert --to q8|q4) loads its codes as they are, with the options it was written with; a
    bitsandbytes checkpoint is dequantized layer by layer and quantized again (that needs
    bitsandbytes)."""
    allowed = {"all", "lm_head"} | ({"group"} if cls is Q4Backend else set())
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key not in allowed:
            raise UsageError(f"backend '{cls.name}' has no option '{key}' (options: {', '.join(sorted(allowed))})")
        if key in ("all", "lm_head") and value is not None:
            raise UsageError(f"option '{key}' of backend '{cls.name}' takes no value")
        if key == "group" and value is None:
            raise UsageError(f"option 'group' of backend '{cls.name}' needs a value (group=32)")
    if "group" in options:
        try:
            kwargs["group"] = int(options["group"])
        except ValueError:
            raise UsageError(f"group must be a whole number, not '{options['group']}'") from None
    kwargs["quantize_all"] = "all" in options
    kwargs["quantize_head"] = "lm_head" in options
    if checkpoint is not None and not checkpoint.bitsandbytes:
        kwargs = _checkpoint_kwargs(cls, options, kwargs, checkpoint)
    return cls(**kwargs)


def other_backend_refusal(checkpoint: Quantization) -> UsageError:
    """What a quantizing backend of another format (q4 for q8, int8, int4) says to a q8 / q4 checkpoint."""
    return UsageError(
        f"this checkpoint is quantized to {checkpoint.format} (vlm's weight-only format): load it with "
        f"-b {checkpoint.format} (or auto), or with -b cpu to dequantize it"
    )


def _checkpoint_kwargs(
    cls: type[WeightOnlyBackend], options: dict[str, str | None], kwargs: dict[str, Any], checkpoint: Quantization
) -> dict[str, Any]:
    """A q8 / q4 checkpoint's own settings, and a refusal for options that contradict them."""
    if checkpoint.method != cls.name:
        raise other_backend_refusal(checkpoint)
    for flag in ("all", "lm_head"):
        if flag in options:
            raise UsageError(f"option '{flag}' quantizes while loading; this checkpoint is already quantized")
    if cls is Q4Backend:
        if "group" in kwargs and kwargs["group"] != checkpoint.group:
            raise UsageError(
                f"this checkpoint is q4 in groups of {checkpoint.group}, not {kwargs['group']}: "
                f"load it with -b q4 (its own group size)"
            )
        kwargs["group"] = checkpoint.group
    return {**kwargs, "quantize_head": checkpoint.quantize_head, "prequantized": True}
