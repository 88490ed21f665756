"""The bitsandbytes checkpoint format, as `transformers` reads and writes it.

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

Nothing here imports bitsandbytes (it takes seconds to import); the code that quantizes and
runs these layers is `backends/bnb.py`.
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
# Every tensor name a Linear layer may own in a checkpoint, longest first so that
# "weight.absmax" is matched before "weight".
LINEAR_PARTS = tuple(sorted(("weight", "bias", *INT8_PARTS, *FOUR_BIT_PARTS), key=len, reverse=True))

FOUR_BIT_TYPES = ("nf4", "fp4")
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

    method: str  # "int8" | "int4"
    quant_type: str | None = None  # "nf4" | "fp4" for int4
    double_quant: bool = False  # int4: quantize the per-block scales too
    threshold: float = 6.0  # int8: activation outlier threshold of LLM.int8
    compute_dtype: str = "float16"  # int4: what transformers computes in (vlm decides itself)
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules as written

    @property
    def format(self) -> str:
        """The per-layer format: int8, nf4 or fp4."""
        return self.quant_type if self.method == "int4" else "int8"

    def describe(self) -> str:
        if self.method == "int8":
            return f"int8 (bitsandbytes LLM.int8, threshold {self.threshold:g})"
        dq = ", double quantization" if self.double_quant else ""
        return f"{self.quant_type} (bitsandbytes 4-bit{dq})"

    def to_config(self) -> dict[str, Any]:
        """The `quantization_config` transformers writes (every key its BitsAndBytesConfig has)."""
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


def read_quantization(config: dict[str, Any]) -> Quantization | None:
    """The checkpoint's quantization from config.json, or None for an unquantized one."""
    q = config.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError("config.json: quantization_config should be a JSON object")
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise UnsupportedModelError(
            f"config.json: quantization method '{method}' is not supported (supported: bitsandbytes)"
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


@dataclass
class QuantizedWeight:
    """A Linear layer's weight as a bitsandbytes checkpoint stores it: the packed weight and
    its quantization state, keyed by the part names above ("weight", "SCB", "weight.absmax"...)."""

    format: str  # "int8" | "nf4" | "fp4"
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
    (shape, safetensors dtype, checkpoint key). Returns "dense", "int8", "nf4" or "fp4";
    raises CheckpointError naming the tensor that does not fit.
    """
    out_f, in_f = shape
    w_shape, w_dtype, w_key = parts["weight"]
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


# ---- sizes, for `vlm info` and shard planning ----------------------------------------------


def int8_bytes(out_f: int, in_f: int) -> int:
    return out_f * in_f + 4 * out_f  # int8 weight + float32 row scales


def four_bit_bytes(out_f: int, in_f: int, double_quant: bool) -> int:
    n = out_f * in_f
    blocks = -(-n // BLOCKSIZE)
    scales = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * 256 if double_quant else 4 * blocks
    return (n + 1) // 2 + scales + 4 * 16  # packed codes + scales + the 16-value code book
