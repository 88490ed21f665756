"""int8 (LLM.int8) and 4-bit (nf4, fp4) weights through bitsandbytes' own modules and kernels.

Quantizing happens while loading, one layer at a time: the loader hands over a layer's
weight as it streams out of the checkpoint, it is quantized on the target device, and the
full-precision copy is dropped before the next layer arrives. A checkpoint that is already
quantized (written by `vlm convert` or by transformers' save_pretrained) is wrapped as it is.

    int8  bnb.nn.Linear8bitLt over Int8Params: int8 weights with one scale per row;
          activations are quantized per row on the fly, and input columns with a value
          above the threshold (6.0) are computed in 16-bit (the LLM.int8 outlier split).
    int4  bnb.nn.Linear4bit over Params4bit: two 4-bit codes per byte, one scale per 64
          values (optionally quantized again: double quantization), computed in fp16 on a GPU,
          fp32 on the CPU.

The vision tower, projector and lm_head stay unquantized unless `all` is asked for.
bitsandbytes takes seconds to import, so it is imported only when one of these runs.

On a CPU with AVX512-BF16 (recent Xeons) bitsandbytes (0.49+) computes a 4-bit layer its own
faster way: Linear4bit.forward repacks the weight on the first call when
`layer.support_avx512bf16_for_cpu` (has_avx512bf16(), read when the layer is built) holds,
the input is on the CPU and no gradient is wanted, and from then on computes in bf16 (the
activations and the per-block scales rounded to bf16, the output too). The repacking
(functional._convert_weight_packed_for_cpu) takes only out_features divisible by 32 and
in_features divisible by the block size (64); any other layer fails there, in
transformers as well ("N must be divisible by block_n", "shape '[64, 1]' is invalid for
input of size 96"). Such a layer stays on bitsandbytes' generic path here (dequantize to
fp32, fp32 product: what every other CPU does), with one notice; the others take the
packed kernel, as transformers' layers do on the same CPU, so the tokens stay the same.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
from typing import Any, Callable

import torch
from torch import nn

from backends.base import LinearWeight, dense_linear, release_freed_memory
from backends.cuda import cuda_unavailable_reason
from vlmcli.errors import CheckpointError, UsageError
from vlmcli.quantization import (
    BLOCKSIZE,
    FOUR_BIT_TYPES,
    Quantization,
    QuantizedWeight,
    four_bit_bytes,
    int8_bytes,
    quantized_by_default,
)

MIN_VERSION = (0, 48)  # CPU kernels for int8 and 4-bit; tested with 0.50.2
_DIST = "bitsandbytes"  # the package looked for (tests point it elsewhere to play "missing")


def bnb_unavailable_reason() -> str | None:
    """None when bitsandbytes can be imported and is recent enough, else why not. Cheap:
    finds the package without importing it."""
    if importlib.util.find_spec(_DIST) is None:
        return "bitsandbytes is not installed (pip install 'bitsandbytes>=0.48')"
    version = importlib.metadata.version(_DIST)
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_VERSION:
        return f"bitsandbytes {version} is too old; vlm needs 0.48 or newer"
    return None


class _DropNoise(logging.Filter):
    """Drops bitsandbytes log lines that say nothing to a vlm user:

    - MatMul8bitLt's "inputs will be cast from torch.float32 to float16", on every call with
      fp32 activations, which is what int8 on the CPU means;
    - "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
      'kernels' ...", logged while bitsandbytes is imported on an AVX512-BF16 CPU when the
      optional `kernels` package (which downloads a kernel from the hub) is not installed;
      bitsandbytes then uses the packed 4-bit kernel it ships, which is what vlm expects."""

    NOISE = ("inputs will be cast from", "Failed to load CPU gemm_4bit_forward from kernels-community")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


# A logger's filters see only the records logged on that logger itself, so each of these
# gets the filter; they are set before bitsandbytes is first imported (the kernels line is
# logged during the import).
_NOISY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def _bnb():
    for name in _NOISY_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in log.filters):
            log.addFilter(_DropNoise())
    import bitsandbytes

    return bitsandbytes


def _cli_notice(message: str) -> None:
    """A notice on stderr: through the CLI's console when `vlm` is running (dim, silenced by
    -q), else as a plain line."""
    console = sys.modules.get("vlmcli.cli.console")
    if console is not None:
        console.notice(message)
    else:
        print(message, file=sys.stderr)


# ---- bitsandbytes' packed 4-bit CPU kernel (AVX512-BF16) ------------------------------------

CPU_PACK_BLOCK_N = 32  # _convert_weight_packed_for_cpu's block_n: out_features a multiple of it


def cpu_packing_fits(out_features: int, in_features: int, blocksize: int = BLOCKSIZE) -> bool:
    """Whether bitsandbytes can repack a 4-bit weight (out, in) for its AVX512-BF16 CPU
    kernel: out_features a multiple of 32 (asserted there), in_features a multiple of the
    block size (its per-block scales are reshaped to (out, in // blocksize); any other
    shape fails, as does in_features under one block)."""
    return out_features % CPU_PACK_BLOCK_N == 0 and in_features % blocksize == 0 and in_features > 0


def cpu_packing_wanted(layer: nn.Module) -> bool:
    """Whether bitsandbytes' Linear4bit `layer` will repack its weight for the packed CPU
    kernel on its first CPU forward (the flag Linear4bit sets from has_avx512bf16())."""
    return bool(getattr(layer, "support_avx512bf16_for_cpu", False))


def keep_off_packed_path(layer: nn.Module) -> bool:
    """Keeps a Linear4bit whose shape the packed CPU kernel cannot take on bitsandbytes'
    generic path (dequantize, then an fp32 product). True when it changed the layer."""
    if cpu_packing_wanted(layer) and not cpu_packing_fits(layer.out_features, layer.in_features):
        layer.support_avx512bf16_for_cpu = False
        return True
    return False


# ---- quantizing and dequantizing single weights (used by `vlm convert` too) -----------------


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight (out, in) -> the tensors an int8 checkpoint stores for it."""
    bnb = _bnb()
    # Int8Params quantizes from fp16 the same way (row absmax of the fp16 weight).
    codes, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return {"weight": codes, "SCB": row_scales, "weight_format": torch.tensor(0, dtype=torch.uint8)}


def quantize_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict[str, torch.Tensor]:
    """A weight (out, in) -> the tensors a 4-bit checkpoint stores for it."""
    bnb = _bnb()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    )
    tensors = {"weight": packed}
    for key, value in state.as_dict(packed=True).items():
        tensors[f"weight.{key}"] = value
    return tensors


def quantize(weight: torch.Tensor, fmt: str, double_quant: bool = False) -> QuantizedWeight:
    out_f, in_f = weight.shape
    tensors = quantize_int8(weight) if fmt == "int8" else quantize_4bit(weight, fmt, double_quant)
    release_freed_memory()
    return QuantizedWeight(fmt, (out_f, in_f), tensors)


def _quant_state(qw: QuantizedWeight, device: torch.device | str = "cpu"):
    bnb = _bnb()
    stats = {k: v for k, v in qw.tensors.items() if k != "weight"}
    try:
        state = bnb.functional.QuantState.from_dict(stats, device=torch.device(device))
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"layer '{qw.name}' has an unreadable 4-bit quantization state ({e})", hint="re-download the model"
        ) from None
    if tuple(state.shape) != qw.shape or state.quant_type != qw.format:
        raise CheckpointError(
            f"layer '{qw.name}': its 4-bit quantization state says {state.quant_type} "
            f"{list(state.shape)}, config.json implies {qw.format} {list(qw.shape)}"
        )
    return state


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """A quantized checkpoint weight -> a float32 (out, in) tensor on the CPU."""
    bnb = _bnb()
    if qw.format == "int8":
        return bnb.functional.int8_vectorwise_dequant(qw.tensors["weight"], qw.tensors["SCB"]).float()
    state = _quant_state(qw)
    return bnb.functional.dequantize_4bit(qw.tensors["weight"], state).float()


# ---- the backends ----------------------------------------------------------------------------


class BnbBackend:
    """What int8 and int4 share: the device, the unquantized dtype, which layers to quantize."""

    name: str
    format: str  # per-layer format: int8, nf4, fp4
    method: str  # int8 | int4, as in quantization_config
    double_quant = False  # int4 only: the per-block scales quantized too
    fuses_projections = False  # bitsandbytes layers stay apart (one quantization state each)

    # Where remarks about the load go (one line each); the caller may set its own.
    notice: Callable[[str], None] = staticmethod(_cli_notice)

    def __init__(self, *, device: str | None = None, quantize_all: bool = False, prequantized: bool = False):
        self._device = device  # None: the GPU when there is one, else the CPU
        self.quantize_all = quantize_all
        self.prequantized = prequantized  # the checkpoint is quantized: keep its layers as they are

    @property
    def device(self) -> torch.device:
        if self._device:
            return torch.device(self._device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    attention_dtype = None

    @property
    def description(self) -> str:
        return f"{self._what()} on the {'GPU' if self.device.type == 'cuda' else 'CPU'}"

    def _what(self) -> str:
        raise NotImplementedError

    def tied_head(self, embedding: torch.Tensor) -> nn.Module | None:
        return None  # lm_head stays plain and shared with the embedding (never quantized)

    def unavailable_reason(self) -> str | None:
        reason = bnb_unavailable_reason()
        if reason is None and self._device == "cuda":
            reason = cuda_unavailable_reason()
        return reason

    def quantizes(self, name: str, keep_dense: bool | None = None) -> bool:
        """Whether a full-precision layer `name` is quantized while loading. keep_dense: the
        family's word on the layer (None: the three-stage default, quantized_by_default)."""
        dense = not quantized_by_default(name) if keep_dense is None else keep_dense
        return not self.prequantized and (self.quantize_all or not dense)

    def place(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def make_linear(
        self, name: str, weight: LinearWeight, bias: torch.Tensor | None, keep_dense: bool | None = None
    ) -> nn.Module:
        if isinstance(weight, QuantizedWeight):
            if weight.format != self.format:
                raise CheckpointError(f"layer '{name}' is stored as {weight.format}, the rest of the checkpoint as {self.format}")
        elif not self.quantizes(name, keep_dense):
            return dense_linear(weight, None if bias is None else self.place(name, bias), self.device, self.dtype)
        layer = self._linear(name, weight, bias is not None)
        if bias is not None:
            layer.bias = nn.Parameter(self.place(name, bias), requires_grad=False)
        if not isinstance(weight, QuantizedWeight) and self.device.type == "cpu":
            release_freed_memory()
        return layer

    def _linear(self, name: str, weight: LinearWeight, has_bias: bool) -> nn.Module:
        raise NotImplementedError

    def _format_bytes(self, fmt: str, out_f: int, in_f: int) -> int:
        if fmt == "int8":
            return int8_bytes(out_f, in_f)
        return four_bit_bytes(out_f, in_f, self.double_quant)

    def linear_bytes(self, name: str, out_features: int, in_features: int, stored: str = "dense") -> int:
        if stored != "dense":
            return self._format_bytes(stored, out_features, in_features)
        if self.quantizes(name):
            return self._format_bytes(self.format, out_features, in_features)
        return out_features * in_features * self.dtype.itemsize


class Int8Backend(BnbBackend):
    name = "int8"
    format = "int8"
    method = "int8"

    def __init__(self, *, threshold: float = 6.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.threshold = threshold

    def _what(self) -> str:
        return f"int8 (LLM.int8, threshold {self.threshold:g})"

    def _linear(self, name: str, weight: LinearWeight, has_bias: bool) -> nn.Module:
        bnb = _bnb()
        out_f, in_f = weight.shape
        layer = bnb.nn.Linear8bitLt(
            in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=self.threshold, device="meta"
        )
        if isinstance(weight, QuantizedWeight):
            param = bnb.nn.Int8Params(
                weight.tensors["weight"], requires_grad=False, has_fp16_weights=False, SCB=weight.tensors["SCB"]
            )
        else:
            param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer.weight = param.to(self.device)  # a CPU weight is quantized by this move
        return layer


class Int4Backend(BnbBackend):
    name = "int4"
    method = "int4"

    def __init__(self, *, quant_type: str = "nf4", double_quant: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        if quant_type not in FOUR_BIT_TYPES:
            raise UsageError(f"unknown 4-bit type '{quant_type}' (choose from: nf4, fp4)")
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.unpacked: list[str] = []  # layers kept off bitsandbytes' packed CPU kernel

    @property
    def format(self) -> str:
        return self.quant_type

    def _what(self) -> str:
        return f"4-bit {self.quant_type}{' + double quant' if self.double_quant else ''}"

    def _linear(self, name: str, weight: LinearWeight, has_bias: bool) -> nn.Module:
        bnb = _bnb()
        out_f, in_f = weight.shape
        layer = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=has_bias,
            compute_dtype=self.dtype,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=torch.uint8,
            device="meta",
        )
        if isinstance(weight, QuantizedWeight):
            _quant_state(weight)  # checks shape and type, with a readable error
            layer.weight = bnb.nn.Params4bit.from_prequantized(
                data=weight.tensors["weight"],
                quantized_stats={k: v for k, v in weight.tensors.items() if k != "weight"},
                requires_grad=False,
                device=self.device,
                module=layer,
            )
        else:
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                blocksize=BLOCKSIZE,
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
                quant_storage=torch.uint8,
                module=layer,
            ).to(self.device)  # quantized by this move
        if self.device.type == "cpu" and keep_off_packed_path(layer):
            if not self.unpacked:
                self.notice(
                    f"int4: {name} ({out_f} x {in_f}) and any other layer whose outputs are not a multiple "
                    f"of {CPU_PACK_BLOCK_N} or inputs not a multiple of {BLOCKSIZE} run on bitsandbytes' "
                    "generic fp32 path; its AVX512-BF16 kernel, used for the rest, cannot take them"
                )
            self.unpacked.append(name)
        return layer


def from_options(cls: type[BnbBackend], options: dict[str, str | None], checkpoint: Quantization | None) -> BnbBackend:
    """A bnb backend from `-b int8:threshold=4` / `-b int4:fp4,dq,all` style options."""
    kwargs: dict[str, Any] = {}
    allowed = {"all", "device"} | ({"threshold"} if cls is Int8Backend else {"nf4", "fp4", "dq"})
    for key, value in options.items():
        if key not in allowed:
            raise UsageError(f"backend '{cls.name}' has no option '{key}' (options: {', '.join(sorted(allowed))})")
        flag = key in ("all", "nf4", "fp4", "dq")
        if flag and value is not None:
            raise UsageError(f"option '{key}' of backend '{cls.name}' takes no value")
        if not flag and value is None:
            raise UsageError(f"option '{key}' of backend '{cls.name}' needs a value ({key}=...)")
    if "threshold" in options:
        try:
            kwargs["threshold"] = float(options["threshold"])
        except ValueError:
            raise UsageError(f"threshold must be a number, not '{options['threshold']}'") from None
        if kwargs["threshold"] < 0:
            raise UsageError("threshold must be 0 (no outlier split) or more")
    if "device" in options:
        if options["device"] not in ("cpu", "cuda"):
            raise UsageError(f"device must be cpu or cuda, not '{options['device']}'")
        kwargs["device"] = options["device"]
    types = [t for t in FOUR_BIT_TYPES if t in options]
    if len(types) > 1:
        raise UsageError("choose one of nf4 and fp4")
    if types:
        kwargs["quant_type"] = types[0]
    if "dq" in options:
        kwargs["double_quant"] = True
    kwargs["quantize_all"] = "all" in options

    if checkpoint is not None:
        if checkpoint.method != cls.method:
            other = "int8" if checkpoint.method == "int8" else "int4"
            raise UsageError(
                f"this checkpoint is quantized to {checkpoint.format}: load it with -b {other} (or auto), "
                f"or with -b cpu / -b cuda to dequantize it"
            )
        if cls is Int4Backend:
            if types and types[0] != checkpoint.quant_type:
                raise UsageError(f"this checkpoint is quantized to {checkpoint.quant_type}, not {types[0]}")
            kwargs["quant_type"] = checkpoint.quant_type
            kwargs["double_quant"] = checkpoint.double_quant
        elif "threshold" not in kwargs:
            kwargs["threshold"] = checkpoint.threshold
        if kwargs["quantize_all"]:
            raise UsageError("option 'all' quantizes while loading; this checkpoint is already quantized")
        kwargs["prequantized"] = True
    return cls(**kwargs)
