"""One GGUF file: its metadata and tensor directory, read once from the header, and its
tensors read (and dequantized) one at a time when asked for.

The header is parsed here rather than through `gguf.GGUFReader`, which builds a numpy view
per array element: SmolLM2-135M's 49k tokens and 49k merges take it 5.5 s on 2 cores,
against 0.1 s for this parser. The format is small (llama.cpp's ggml/include/gguf.h):

    "GGUF", version u32 (2 or 3), tensor count u64, metadata count u64
    metadata: key (u64 length + UTF-8), value type u32, value (arrays: type u32, count u64, items)
    tensor infos: name, n_dims u32, ne[n_dims] u64 (fastest dimension first), ggml type u32, offset u64
    padding to general.alignment (32), then the tensor data

The `gguf` package supplies the type tables (GGML_QUANT_SIZES) and the block decoders
(gguf.quants.dequantize); nothing here hand-writes a quantization format.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmcli.errors import CheckpointError, UnsupportedModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUFValueType -> (struct format, size) for the scalar types
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# Weights vlm reads: kept as stored (float) or dequantized with gguf.quants (the rest).
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def quant_types() -> tuple[str, ...]:
    """The block formats gguf.quants can decode (Q8_0, Q4_0, Q4_1, Q5_*, the K-quants, the IQ types ...)."""
    from gguf.quants import _type_traits

    return tuple(sorted(t.name for t in _type_traits if t.name not in FLOAT_TYPES))


def check_readable(file: "GGUFFile", name: str) -> None:
    kind = file.tensors[name].type_name
    if kind not in FLOAT_TYPES and kind not in quant_types():
        raise UnsupportedModelError(
            f"{file.path.name}: tensor '{name}' is stored as {kind}, which vlm cannot read "
            f"(it reads F32, F16, BF16 and {', '.join(q for q in quant_types() if q[0] == 'Q')} among others)"
        )


def short_float(value: float) -> float:
    """A float32 from the metadata as the decimal it was written from: GGUF stores
    rms_norm_eps 1e-5 as 9.99999974e-06, and the shortest decimal that is the same float32
    gives the original back (the config's value, bit for bit)."""
    return float(str(np.float32(value)))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml type: F32, F16, Q4_K ...
    shape: tuple[int, ...]  # torch order (ne reversed): (out_features, in_features) for a matrix
    offset: int  # from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """The metadata and tensor directory of one GGUF file (no tensor data is read)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = f.seek(0, 2)
                if self.size < 24:
                    raise self._error("is too short to be a GGUF file" if self.size else "is empty")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._parse(buf)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None

    def _error(self, what: str, hint: str | None = None) -> CheckpointError:
        return CheckpointError(f"{self.path.name} {what}", hint=hint)

    def _parse(self, buf) -> None:
        magic = bytes(buf[:4])
        if magic != MAGIC:
            raise self._error(f"is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in (2, 3):
            swapped = struct.unpack_from(">I", buf, 4)[0]
            why = "a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {version}"
            raise UnsupportedModelError(f"{self.path.name} is {why}; vlm reads little-endian GGUF v2 and v3")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        cursor = _Cursor(buf, 24, self)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.u32())
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            n_dims = cursor.u32()
            if n_dims > 4:
                raise self._error(f"has a tensor '{name}' of {n_dims} dimensions", hint="the file is corrupt; re-download it")
            ne = [cursor.u64() for _ in range(n_dims)]
            ggml_type, offset = cursor.u32(), cursor.u64()
            infos.append((name, ne, ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, offset in infos:
            info = self._tensor_info(name, ne, ggml_type, data_start + offset)
            if info.offset + info.nbytes > self.size:
                raise self._error(f"is truncated (it ends inside tensor '{name}')", hint="re-download it")
            self.tensors[name] = info

    def _tensor_info(self, name: str, ne: list[int], ggml_type: int, offset: int) -> TensorInfo:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise UnsupportedModelError(f"{self.path.name}: tensor '{name}' has unknown ggml type {ggml_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        numel = 1
        for d in ne:
            numel *= d
        if ne and ne[0] % block:
            raise self._error(f"has tensor '{name}' whose rows ({ne[0]}) are not whole {qtype.name} blocks")
        return TensorInfo(name, qtype.name, tuple(reversed(ne)), offset, numel // block * type_size)

    # ---- metadata

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise self._error(f"has no '{key}' metadata", hint="it is not a complete llama.cpp model file")
        return self.metadata[key]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    # ---- tensors

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored for float types (a map of the file's bytes where large),
        else dequantized to float32 by gguf.quants, in torch order."""
        info = self.tensors[name]
        check_readable(self, name)
        from vlmcli.checkpoint import _OWN_MAP_BYTES, _map_tensor

        with open(self.path, "rb") as f:
            raw = None
            if info.nbytes >= _OWN_MAP_BYTES:
                raw = _map_tensor(f, info.offset, info.nbytes)
            if raw is None:
                raw = torch.empty(info.nbytes, dtype=torch.uint8)
                f.seek(info.offset)
                if f.readinto(raw.numpy()) != info.nbytes:
                    raise self._error(f"is truncated (it ends inside tensor '{name}')", hint="re-download it")
        if info.type_name in FLOAT_TYPES:
            dtype = FLOAT_TYPES[info.type_name]
            if info.offset % dtype.itemsize:  # a view needs aligned data; llama.cpp aligns to 32
                raw = raw.clone()
            return raw.view(dtype).reshape(info.shape)
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        # In row blocks of ~8 MB of output: gguf.quants' numpy decoders make temporaries
        # several times their output, which for a 7B model's embedding would be gigabytes.
        qtype = GGMLQuantizationType[info.type_name]
        width = info.shape[-1] if info.shape else 1
        rows = raw.numpy().reshape(-1, info.nbytes // max(1, info.numel // width))
        out = torch.empty(info.shape, dtype=torch.float32)
        flat = out.view(-1, width)
        step = max(1, (8 << 20) // (4 * width))
        for i in range(0, rows.shape[0], step):
            flat[i : i + step] = torch.from_numpy(dequantize(rows[i : i + step], qtype))
        return out


_opened: dict[tuple, GGUFFile] = {}


def open_gguf(path: Path) -> GGUFFile:
    """GGUFFile(path), parsed once per process while the file stays the same (a command
    reads a pair's headers several times: to present it, plan the load, and load)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _opened:
        _opened[key] = GGUFFile(path)
    return _opened[key]


class _Cursor:
    """Reads the header's little-endian values in turn, naming the file when it ends early."""

    def __init__(self, buf, pos: int, owner: GGUFFile):
        self.buf, self.pos, self.owner = buf, pos, owner
        self.end = len(buf)

    def _take(self, n: int) -> int:
        start = self.pos
        if start + n > self.end:
            raise self.owner._error("is truncated (it ends inside its header)", hint="re-download it")
        self.pos += n
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self._take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self._take(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return struct.unpack_from(fmt, self.buf, self._take(size))[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _NP_SCALARS:  # numbers: one numpy read, not count struct calls
                dtype = np.dtype(_NP_SCALARS[item_type])
                start = self._take(dtype.itemsize * count)
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()
                return [bool(v) for v in values] if item_type == 7 else values
            return [self.value(item_type) for _ in range(count)]
        raise self.owner._error(f"has metadata of unknown type {vtype}", hint="the file is corrupt; re-download it")
