"""The formats of pre-quantized checkpoints: bitsandbytes' (as `transformers` reads and
writes it) and vlm's own weight-only format (what `vlm convert --to q8|q4` writes).

A bitsandbytes checkpoint is an ordinary safetensors checkpoint in which some Linear layers
carry a quantized weight plus its quantization state, and config.json says so:

    "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": true, ...}

Per quantized Linear `P` (the names `save_pretrained` writes, verified with transformers 5.24
and bitsandbytes 0.50):

    int8 (LLM.int8)   P.weight          int8 (out, in)    row-major, one scale per row
                      P.SCB             float32 (out,)    the row scales (absmax)
                      P.weight_format   uint8 ()          0 = "row" (older layouts are refused)
    4-bit (nf4/fp4)   P.weight          uint8 (ceil(out*in/2), 1), two codes per byte
                      P.weight.absmax   float32 (blocks,) one scale per 64 values, or uint8 when
                                                          the scales are quantized again
                                                          ("double quantization") ...
                      P.weight.nested_absmax, P.weight.nested_quant_map   ... with these two
                      P.weight.quant_map float32 (16,)    the 16 code values
                      P.weight.quant_state.bitsandbytes__nf4 (or __fp4)   uint8: a JSON object
                                                          (shape, blocksize, dtype, ...)

vlm's weight-only format ("quant_method": "vlm-weight-only") holds the codes and scales of
the q8 and q4 backends (backends/weight_only.py) as plain tensors, in no kernel's packed
layout, so a checkpoint does not depend on the CPU, the PyTorch version or the kernel that
will run it (the int4 kernel's layout from _convert_weight_to_int4pack_for_cpu is all
three). Loading one with -b q8 / -b q4 rebuilds exactly the layers that quantizing the
original while loading builds; any other backend gets each layer dequantized once.

    q8   P.weight        int8 (out, in)       codes, -127..127
         P.weight_scale  bfloat16 (out,)      w = code * scale (symmetric, one scale per row)
    q4   P.weight        uint8 (out, in / 2)  codes 0..15, two per byte: input 2j in the low
                                              nibble of byte j, input 2j + 1 in the high one
         P.weight_scale  bfloat16 (out, in / group)   w = (code - 8) * scale + zero, one
         P.weight_zero   bfloat16 (out, in / group)   (scale, zero) per `group` inputs of a row

    "quantization_config": {"quant_method": "vlm-weight-only", "format": "q4", "bits": 4,
        "group_size": 32, "symmetric": false, "scale_dtype": "bfloat16",
        "quantize_lm_head": false, "modules_to_not_convert": [...], "format_version": 1}

Layers the kernels cannot take (inputs not a multiple of 32, or of the group) and those kept
by default (vision tower, projector, lm_head) are stored unquantized. A tied lm_head is the
embedding matrix, stored once in full precision; with "quantize_lm_head" its codes are
computed from it while loading (as `-b q8:lm_head` does), not stored.

Why not torchao's format (transformers' TorchAoConfig with safetensors, torchao 0.18, which
installs against torch 2.13): its serializer stores tensor subclasses by class name with
their attributes as JSON in the safetensors metadata, and covers int8 (Int8Tensor) but not
the CPU int4 layout (Int4OpaqueTensor is not among the serializable types); its int8 scales
are float32 absmax / 127.5 over -128..127, not q8's bf16 absmax / 127, so matching it would
change q8's numbers; and reading it back takes torchao, which vlm does not depend on.

Nothing here imports bitsandbytes (it takes seconds to import); the code that quantizes and
runs these layers is `backends/bnb.py` and `backends/weight_only.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmcli.errors import CheckpointError, UnsupportedModelError

INT8_PARTS = ("SCB", "weight_format")
FOUR_BIT_PARTS = (
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
)
WEIGHT_ONLY_PARTS = ("weight_scale", "weight_zero")
# Every tensor name a Linear layer may own in a checkpoint, longest first so that
# "weight.absmax" is matched before "weight".
LINEAR_PARTS = tuple(
    sorted(("weight", "bias", *INT8_PARTS, *FOUR_BIT_PARTS, *WEIGHT_ONLY_PARTS), key=len, reverse=True)
)

FOUR_BIT_TYPES = ("nf4", "fp4")
BITSANDBYTES_METHODS = ("int8", "int4")
WEIGHT_ONLY = "vlm-weight-only"  # quant_method of vlm's own format
WEIGHT_ONLY_FORMATS = ("q8", "q4")  # its per-layer formats, named as the backends that run them
WEIGHT_ONLY_VERSION = 1  # format_version written; a checkpoint of a later one is refused
BLOCKSIZE = 64  # bitsandbytes' (and transformers') 4-bit block size
NESTED_BLOCKSIZE = 256  # block size of the second quantization of the absmax values

# transformers' name for the output layer in a quantization config's skip list (the vision
# tower's and projector's names are the family's: Family.hf_skip_modules).
HF_LM_HEAD = "lm_head"

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_DTYPE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}

# The three-stage default of which Linear layers stay 16-bit (fp32 on the CPU): the vision
# tower, the projector and lm_head. The loader passes each family's own word (keep_dense);
# this is what a backend assumes when asked about a layer without one.
UNQUANTIZED_BY_DEFAULT = ("vision.", "projector.", "decoder.lm_head")


def quantized_by_default(module_name: str) -> bool:
    """Whether a Linear layer (our name) is quantized by default: the decoder's blocks are,
    the vision tower, the projector and lm_head are not (a small part of a 7B model, and
    the parts most sensitive to rounding)."""
    return not module_name.startswith(UNQUANTIZED_BY_DEFAULT)


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint is quantized (or how to quantize one): a `quantization_config`."""

    method: str  # "int8" | "int4" (bitsandbytes) | "q8" | "q4" (vlm weight-only)
    quant_type: str | None = None  # "nf4" | "fp4" for int4
    double_quant: bool = False  # int4: quantize the per-block scales too
    threshold: float = 6.0  # int8: activation outlier threshold of LLM.int8
    compute_dtype: str = "float16"  # int4: what transformers computes in (vlm decides itself)
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules / modules_to_not_convert
    group: int | None = None  # q4: inputs of a row per (scale, zero)
    quantize_head: bool = False  # q8 / q4: lm_head quantized too (a tied one while loading)

    @property
    def format(self) -> str:
        """The per-layer format: int8, nf4, fp4, q8 or q4."""
        return self.quant_type if self.method == "int4" else self.method

    @property
    def bitsandbytes(self) -> bool:
        """Whether bitsandbytes wrote (and is needed to read) this checkpoint."""
        return self.method in BITSANDBYTES_METHODS

    def describe(self) -> str:
        if not self.bitsandbytes:
            what = "int8, one scale per row" if self.method == "q8" else f"int4, groups of {self.group}"
            head = ", lm_head too" if self.quantize_head else ""
            return f"{self.method} (vlm weight-only {what}{head})"
        if self.method == "int8":
            return f"int8 (bitsandbytes LLM.int8, threshold {self.threshold:g})"
        dq = ", double quantization" if self.double_quant else ""
        return f"{self.quant_type} (bitsandbytes 4-bit{dq})"

    def to_config(self) -> dict[str, Any]:
        """The `quantization_config` transformers writes (every key its BitsAndBytesConfig
        has), or vlm's weight-only one (see the module docstring)."""
        if not self.bitsandbytes:
            return self._weight_only_config()
        four = self.method == "int4"
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": not four,
            "_load_in_4bit": four,
            "load_in_8bit": not four,
            "load_in_4bit": four,
            "llm_int8_threshold": self.threshold,
            "llm_int8_skip_modules": list(self.skip_modules) if self.skip_modules is not None else None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
        }

    def _weight_only_config(self) -> dict[str, Any]:
        four = self.method == "q4"
        return {
            "quant_method": WEIGHT_ONLY,
            "format": self.method,
            "bits": 4 if four else 8,
            "group_size": self.group if four else None,  # q8: one scale per output row
            "symmetric": not four,
            "scale_dtype": "bfloat16",
            "quantize_lm_head": self.quantize_head,
            "modules_to_not_convert": list(self.skip_modules or ()),
            "format_version": WEIGHT_ONLY_VERSION,
        }


def read_quantization(config: dict[str, Any]) -> Quantization | None:
    """The checkpoint's quantization from config.json, or None for an unquantized one."""
    q = config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError("config.json: quantization_config should be a JSON object")
    method = q.get("quant_method", "bitsandbytes")
    if method == WEIGHT_ONLY:
        return _read_weight_only(q)
    if method != "bitsandbytes":
        raise UnsupportedModelError(
            f"config.json: quantization method '{method}' is not supported (supported: bitsandbytes, {WEIGHT_ONLY})"
        )
    skip = q.get("llm_int8_skip_modules")
    skip = tuple(skip) if isinstance(skip, list) else None
    threshold = float(q.get("llm_int8_threshold", 6.0))
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        if q.get("llm_int8_has_fp16_weight"):
            raise UnsupportedModelError("config.json: int8 checkpoints with fp16 weights kept for training are not supported")
        return Quantization("int8", threshold=threshold, skip_modules=skip)
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        quant_type = q.get("bnb_4bit_quant_type", "fp4")
        if quant_type not in FOUR_BIT_TYPES:
            raise UnsupportedModelError(f"config.json: 4-bit type '{quant_type}' is not supported (supported: nf4, fp4)")
        return Quantization(
            "int4",
            quant_type=quant_type,
            double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
            threshold=threshold,
            compute_dtype=str(q.get("bnb_4bit_compute_dtype") or "float32"),
            skip_modules=skip,
        )
    raise CheckpointError("config.json: a bitsandbytes quantization_config with neither load_in_8bit nor load_in_4bit")


def _read_weight_only(q: dict[str, Any]) -> Quantization:
    version = q.get("format_version")
    if version != WEIGHT_ONLY_VERSION:
        raise UnsupportedModelError(
            f"config.json: {WEIGHT_ONLY} format_version {version} is not supported (this vlm reads {WEIGHT_ONLY_VERSION})"
        )
    fmt = q.get("format")
    if fmt not in WEIGHT_ONLY_FORMATS or q.get("bits") != (8 if fmt == "q8" else 4):
        raise CheckpointError(
            f"config.json: {WEIGHT_ONLY} with format {fmt!r} and bits {q.get('bits')!r} (expected q8 / 8 or q4 / 4)"
        )
    group = q.get("group_size")
    if fmt == "q4" and (not isinstance(group, int) or isinstance(group, bool) or group <= 0):
        raise CheckpointError(f"config.json: a q4 checkpoint needs a whole group_size, not {group!r}")
    skip = q.get("modules_to_not_convert")
    return Quantization(
        fmt,
        skip_modules=tuple(skip) if isinstance(skip, list) else None,
        group=group if fmt == "q4" else None,
        quantize_head=bool(q.get("quantize_lm_head", False)),
    )


@dataclass
class QuantizedWeight:
    """A Linear layer's weight as a quantized checkpoint stores it: the packed weight and its
    quantization state, keyed by the part names above ("weight", "SCB", "weight.absmax",
    "weight_scale"...)."""

    format: str  # "int8" | "nf4" | "fp4" (bitsandbytes) | "q8" | "q4" (vlm weight-only)
    shape: tuple[int, int]  # (out_features, in_features) of the unquantized weight
    tensors: dict[str, torch.Tensor] = field(repr=False)
    name: str = ""  # the layer, for error messages

    def __post_init__(self):
        fmt = self.tensors.get("weight_format")
        if self.format == "int8" and fmt is not None and int(fmt.item()) != 0:
            # bitsandbytes before 0.45 could save int8 weights in tiled GPU layouts
            raise CheckpointError(
                f"int8 layer '{self.name}' is stored in a GPU-specific layout (weight_format "
                f"{int(fmt.item())}); only the row-major layout (0) is supported",
                hint="re-save it with bitsandbytes >= 0.45",
            )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def layer_format(
    module: str,
    parts: dict[str, tuple[tuple[int, ...], str, str]],
    shape: tuple[int, int],
) -> str:
    """Classify and check one Linear layer's tensors from the safetensors headers alone.

    `parts` maps each part name ("weight", "bias", "SCB", "weight.absmax", ...) to
    (shape, safetensors dtype, checkpoint key). Returns "dense", "int8", "nf4", "fp4", "q8"
    or "q4"; raises CheckpointError naming the tensor that does not fit.
    """
    out_f, in_f = shape
    w_shape, w_dtype, w_key = parts["weight"]
    if "weight_scale" in parts:
        return _weight_only_format(parts, shape)
    four_bit = [p for p in parts if p.startswith("weight.quant_state.bitsandbytes__")]
    if len(four_bit) > 1:
        raise CheckpointError(f"layer '{module}' has both nf4 and fp4 quantization state")
    if four_bit:
        quant_type = four_bit[0].rsplit("__", 1)[1]
        for needed in ("weight.absmax", "weight.quant_map"):
            if needed not in parts:
                raise CheckpointError(f"4-bit tensor '{w_key}' has no '{needed}' beside it", hint="re-download the model")
        nested = [p for p in ("weight.nested_absmax", "weight.nested_quant_map") if p in parts]
        if len(nested) == 1:
            raise CheckpointError(f"4-bit tensor '{w_key}' has half of its nested quantization state")
        packed = math.prod(w_shape) * _DTYPE_BYTES.get(w_dtype, 1)
        if packed != (out_f * in_f + 1) // 2:
            raise CheckpointError(
                f"4-bit tensor '{w_key}' holds {packed} bytes but config.json implies "
                f"[{out_f}, {in_f}] ({(out_f * in_f + 1) // 2} bytes packed)"
            )
        return quant_type
    if "SCB" in parts:
        if w_dtype != "I8":
            raise CheckpointError(f"tensor '{w_key}' has int8 scales (SCB) but is {w_dtype}, not int8")
        if tuple(w_shape) != shape:
            raise CheckpointError(
                f"tensor '{w_key}' has shape {list(w_shape)} but config.json implies {list(shape)}"
            )
        scb_shape = parts["SCB"][0]
        if tuple(scb_shape) != (out_f,):
            raise CheckpointError(f"tensor '{parts['SCB'][2]}' has shape {list(scb_shape)}, expected [{out_f}]")
        return "int8"
    stray = [parts[p][2] for p in parts if p not in ("weight", "bias")]
    if stray:
        raise CheckpointError(f"tensor '{stray[0]}' is quantization state for a layer whose weight is not quantized")
    if tuple(w_shape) != shape:
        raise CheckpointError(f"tensor '{w_key}' has shape {list(w_shape)} but config.json implies {list(shape)}")
    if w_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor '{w_key}' is {w_dtype}; expected a floating-point type")
    return "dense"


def _weight_only_format(parts: dict[str, tuple[tuple[int, ...], str, str]], shape: tuple[int, int]) -> str:
    """q8 or q4, from the shapes and dtypes of a layer's codes and scales (module docstring)."""
    out_f, in_f = shape
    w_shape, w_dtype, w_key = parts["weight"]
    s_shape, s_dtype, s_key = parts["weight_scale"]
    stray = [parts[p][2] for p in parts if p not in ("weight", "bias", *WEIGHT_ONLY_PARTS)]
    if stray:
        raise CheckpointError(f"tensor '{stray[0]}' is bitsandbytes state beside vlm weight-only scales '{s_key}'")
    if s_dtype != "BF16":
        raise CheckpointError(f"tensor '{s_key}' is {s_dtype}; weight-only scales are BF16")
    if w_dtype == "I8":
        if tuple(w_shape) != shape or tuple(s_shape) != (out_f,) or "weight_zero" in parts:
            raise CheckpointError(
                f"q8 tensors '{w_key}' {list(w_shape)} and '{s_key}' {list(s_shape)} do not fit "
                f"config.json's [{out_f}, {in_f}] (expected [{out_f}, {in_f}] and [{out_f}], no zeros)"
            )
        return "q8"
    if w_dtype != "U8":
        raise CheckpointError(f"tensor '{w_key}' is {w_dtype}; weight-only codes are I8 (q8) or U8 (q4)")
    if "weight_zero" not in parts:
        raise CheckpointError(f"q4 tensor '{w_key}' has no 'weight_zero' beside it", hint="re-download the model")
    z_shape, z_dtype, z_key = parts["weight_zero"]
    groups = s_shape[1] if len(s_shape) == 2 else 0
    fits = (
        in_f % 2 == 0
        and tuple(w_shape) == (out_f, in_f // 2)
        and len(s_shape) == 2
        and s_shape[0] == out_f
        and groups > 0
        and in_f % groups == 0
        and tuple(z_shape) == tuple(s_shape)
        and z_dtype == "BF16"
    )
    if not fits:
        raise CheckpointError(
            f"q4 tensors '{w_key}' {list(w_shape)}, '{s_key}' {list(s_shape)}, '{z_key}' {list(z_shape)} {z_dtype} "
            f"do not fit config.json's [{out_f}, {in_f}] (expected [{out_f}, {in_f // 2}] codes and BF16 "
            f"[{out_f}, {in_f} / group] scales and zeros)"
        )
    return "q4"


def concat_rows(parts: list[QuantizedWeight], name: str) -> QuantizedWeight:
    """Weight-only layers stacked along their outputs (q/k/v, gate/up fused while loading):
    every tensor of the format has one row per output, and each row is quantized on its own,
    so the result is what quantizing the stacked weight gives."""
    fmt = parts[0].format
    if fmt not in WEIGHT_ONLY_FORMATS or any(p.format != fmt for p in parts):
        raise ValueError(f"cannot stack layers stored as {[p.format for p in parts]}")
    tensors = {key: torch.cat([p.tensors[key] for p in parts]) for key in parts[0].tensors}
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    return QuantizedWeight(fmt, shape, tensors, name)


# ---- sizes, for `vlm info` and shard planning ----------------------------------------------


def int8_bytes(out_f: int, in_f: int) -> int:
    return out_f * in_f + 4 * out_f  # int8 weight + float32 row scales


def four_bit_bytes(out_f: int, in_f: int, double_quant: bool) -> int:
    n = out_f * in_f
    blocks = -(-n // BLOCKSIZE)
    scales = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * 256 if double_quant else 4 * blocks
    return (n + 1) // 2 + scales + 4 * 16  # packed codes + scales + the 16-value code book
