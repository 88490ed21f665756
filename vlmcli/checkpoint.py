"""Checkpoints on disk: find them (local folder, hub id, the bundled demo), check them, and
stream their tensors.

A checkpoint is data, never code: safetensors only (pickle `.bin`/`.pt` files are refused),
`auto_map` entries are ignored, and shard names in an index must stay inside the folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import re
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from vlmcli.errors import CheckpointError, UsageError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# What the hub download fetches: configs, weights, tokenizer and template files. Never
# pickles or Python files. qwen.tiktoken: Qwen-VL's vocabulary (it has no tokenizer.json).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "qwen.tiktoken"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def demo_path() -> Path:
    """The small model bundled with the package (`-m demo`)."""
    return Path(__file__).parent / "demo_model"


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); a plain id -> (id, None)."""
    if "@" in ref:
        repo, rev = ref.rsplit("@", 1)
        return repo, rev or None
    return ref, None


def resolve(ref: str, *, progress: bool = True, mmproj: str | None = None) -> Path:
    """A model folder for `ref`: 'demo', a local folder, or a hub repo id (`id@revision`).
    A GGUF file (with its `mmproj` vision file, if any) or a folder of GGUF files is
    presented as a model folder too (vlmcli/gguf/source.py)."""
    gguf_folder = _resolve_gguf(ref, mmproj)
    if gguf_folder is not None:
        return gguf_folder
    if ref == "demo":
        path = demo_path()
        if not (path / "config.json").exists():
            raise CheckpointError("the bundled demo model is not part of this installation")
        return path
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    repo, revision = parse_model_ref(ref)
    if local.exists() or not _REPO_ID.match(repo) or ref.startswith((".", "/", "~")):
        raise UsageError(f"model '{ref}' is neither a folder nor a hub repo id like 'org/name'")
    return _download(repo, revision, progress=progress)


def _resolve_gguf(ref: str, mmproj: str | None) -> Path | None:
    from vlmcli.gguf import source

    local = Path(ref).expanduser()
    if source.is_gguf(local):
        return source.present(local, None if mmproj is None else Path(mmproj))
    if local.is_dir() and not (local / "config.json").exists() and any(source.is_gguf(p) for p in local.iterdir()):
        model, found = source.find_pair(local)
        return source.present(model, Path(mmproj) if mmproj is not None else found)
    if mmproj is not None:
        raise UsageError(f"--mmproj goes with a GGUF model (-m MODEL.gguf); '{ref}' is not one")
    return None


def _download(repo: str, revision: str | None, *, progress: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    try:
        path = huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=HUB_PATTERNS, tqdm_class=None if progress else _Silent
        )
    except GatedRepoError:
        raise CheckpointError(
            f"'{repo}' is gated on the hub: accept its licence there and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no model '{repo}' on the hub (or it is private)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"'{repo}' has no revision '{revision}'") from None
    except LocalEntryNotFoundError:
        offline = constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointError(
            f"model '{repo}' is not in the cache ({cache}) and {why}",
            hint="use -m demo for the bundled model or -m PATH for a local folder",
        ) from None
    except OSError as e:  # network failures surface as requests/httpx errors deriving OSError
        raise CheckpointError(f"could not download '{repo}': {e}") from None
    return Path(path)


try:  # tqdm is a dependency of huggingface_hub; a silent subclass hides its bars under -q
    from tqdm.auto import tqdm as _tqdm

    class _Silent(_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

except ImportError:  # pragma: no cover
    _Silent = None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing from {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face model folder")
    return read_json(folder / "config.json")


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of a checkpoint, and which tensor lives in which."""

    files: tuple[Path, ...]


def weight_files(folder: Path) -> WeightFiles:
    from vlmcli.gguf import source

    if source.is_presented(folder):  # a GGUF pair: its own reader (a GGUFWeights)
        return source.weights_of(folder)
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        names: list[str] = []
        for shard in weight_map.values():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index}: shard names must be strings")
            if "\x00" in shard:  # no file can have such a name; the OS refuses the path
                raise CheckpointError(f"{index} names a shard with a NUL character: {shard!r}")
            if shard not in names:
                names.append(shard)
        files = []
        root = folder.resolve()
        for name in names:
            path = (folder / name).resolve()
            if Path(name).is_absolute() or root not in path.parents:
                raise CheckpointError(f"{index} names a shard outside the model folder: '{name}'")
            if not path.exists():
                raise CheckpointError(
                    f"shard '{name}' listed in {INDEX_NAME} is missing", hint="re-download the model"
                )
            files.append(path)
        return WeightFiles(tuple(files))
    single = folder / SINGLE_NAME
    if single.exists():
        return WeightFiles((single,))
    stray = sorted(folder.glob("*.safetensors"))
    if len(stray) == 1:
        return WeightFiles((stray[0],))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run code when "
            f"loaded; vlm reads safetensors only",
            hint="convert them once with a tool you trust, or use a repo that ships .safetensors",
        )
    raise CheckpointError(f"{folder} has no model.safetensors or {INDEX_NAME}")


def iter_tensors(files: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, tensor) of the checkpoint, one at a time, read from disk when asked for.

    A tensor of 1 MiB or more is a copy-on-write map of its own bytes of the file (see
    _map_tensor), a smaller one a plain read. Never one map of the whole shard: a map keeps
    every page it has touched resident (and counted in the process's memory) until it is
    closed, so loading through one costs the whole shard on top of the model; mapped tensor
    by tensor, a tensor the backend converts costs its pages only until it is dropped."""
    if not isinstance(files, WeightFiles):  # a GGUF pair (vlmcli/gguf/source.py)
        yield from files.iter_tensors()
        return
    for path in files.files:
        try:
            with open(path, "rb") as f:
                header, data_start = _read_header(f, path)
                size = os.fstat(f.fileno()).st_size
                for name in sorted(header):
                    yield name, _read_tensor(f, path, name, header[name], data_start, size)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _invalid(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path.name} is not a valid safetensors file ({why})", hint="re-download the model")


def _read_header(f, path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (8-byte little-endian length, then JSON) minus its metadata."""
    raw = f.read(8)
    if len(raw) < 8:
        raise _invalid(path, "file too short")
    n = int.from_bytes(raw, "little")
    if n > 100 * 2**20:
        raise _invalid(path, f"header of {n} bytes")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _invalid(path, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(f, path: Path, name: str, info: Any, data_start: int, size: int) -> torch.Tensor:
    try:
        dtype = _TORCH_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise _invalid(path, f"bad header entry for '{name}'") from None
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * dtype.itemsize or begin < 0:
        raise _invalid(path, f"'{name}' has {end - begin} bytes for shape {shape} of {info['dtype']}")
    nbytes = end - begin
    if data_start + end > size:  # checked before mapping: reading a map past the end is SIGBUS
        raise _invalid(path, f"file ends inside '{name}' (truncated)")
    offset = data_start + begin
    if nbytes >= _OWN_MAP_BYTES and offset % dtype.itemsize == 0:
        mapped = _map_tensor(f, offset, nbytes)
        if mapped is not None:
            return mapped.view(dtype).reshape(shape)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(offset)
    if f.readinto(buf.numpy()) != nbytes:
        raise _invalid(path, f"file ends inside '{name}' (truncated)")
    return buf.view(dtype).reshape(shape)


_OWN_MAP_BYTES = 1 << 20


def _map_tensor(f, offset: int, nbytes: int) -> torch.Tensor | None:
    """`nbytes` of the file at `offset` as a private (copy-on-write) map of their own,
    unmapped the moment the tensor is freed; None where the file cannot be mapped.

    Why a map and not a read: a weight the backend copies anyway (converted to another
    dtype, transposed, quantized) is then read once, straight from the page cache, instead
    of first copied into fresh memory (SmolLM2 LLaVA, 519 MB of fp32 on 2 EPYC cores: load
    1.07 -> 0.34 s); one kept as it is stays shared with the page cache. (From malloc, a
    tensor a backend converts and drops would stay in the heap, where glibc keeps freed
    blocks of up to 32 MB, and a load would grow by every layer it quantized.)

    libc's mmap rather than Python's: a Python map holds a duplicate of the file descriptor
    for as long as it lives, and a model keeps hundreds of its tensors as they are (past
    the usual limit of 1024 open files). Reading a map past the file's end faults: the
    caller has checked the size, and a file truncated in place while a model runs (not
    what huggingface_hub or `vlm convert` do: they write elsewhere and rename) ends it."""
    if _libc is None:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + nbytes - start
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, f.fileno(), start)
    if addr in (None, ctypes.c_void_p(-1).value):  # MAP_FAILED: a filesystem without mmap
        return None
    pages = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))
    weakref.finalize(pages, _libc.munmap, addr, length)  # when the last tensor on it is freed
    return torch.from_numpy(pages)[offset - start :]


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_libc = _load_libc()


def tensor_shapes(files: WeightFiles) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from the headers alone, without reading any data."""
    if not isinstance(files, WeightFiles):  # a GGUF pair (vlmcli/gguf/source.py)
        return files.tensor_shapes()
    out = {}
    for path in files.files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path.name} is not a valid safetensors file ({e})", hint="re-download the model"
            ) from None
    return out



# ---- writing (vlm convert) -----------------------------------------------------------------

_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2 * 2**30, '1000' -> 1000 (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*", text.upper())
    if not m:
        raise UsageError(f"'{text}' is not a size (examples: 500MB, 5GB, 2GiB)")
    number, prefix, suffix = float(m.group(1)), m.group(2), m.group(3)
    base = 1024 if suffix == "IB" else 1000
    return int(number * base ** " KMGT".index(prefix or " "))


class _Shard:
    """One safetensors file being written: tensor bytes go to a side file as they come, and
    the header (which must come first, and lists every tensor) is put in front at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_suffix(".data")
        self.data = open(self.data_path, "wb")
        self.header: dict[str, Any] = {}
        self.size = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot store {tensor.dtype} in safetensors")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.data.write(memoryview(raw))
        self.header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + raw.nbytes],
        }
        self.size += raw.nbytes

    def finish(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keeps the tensor data 8-byte aligned, as safetensors does
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()


class ShardedWriter:
    """Safetensors shards of at most `max_shard_bytes` each (a larger tensor gets one of its
    own), written one tensor at a time so memory holds a single tensor, never a shard.

    close() names them as transformers does: `model.safetensors` when one is enough, else
    `model-00001-of-0000N.safetensors` and `model.safetensors.index.json`."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[_Shard] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if not self.shards or (self.shards[-1].size and self.shards[-1].size + nbytes > self.max_shard_bytes):
            if self.shards:
                self.shards[-1].finish()
            self.shards.append(_Shard(self.folder / f".shard-{len(self.shards) + 1}.safetensors"))
        self.shards[-1].write(name, tensor)
        self.total_size += nbytes

    def close(self) -> list[Path]:
        if not self.shards:
            raise ValueError("no tensors written")
        self.shards[-1].finish()
        n = len(self.shards)
        if n == 1:
            names = [SINGLE_NAME]
        else:
            names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for shard, name in zip(self.shards, names):
            shard.path.rename(self.folder / name)
        paths = [self.folder / name for name in names]
        if n > 1:
            weight_map = {t: name for shard, name in zip(self.shards, names) for t in shard.header}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(self.folder / INDEX_NAME, index)
            paths.append(self.folder / INDEX_NAME)
        return paths


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON the way Hugging Face files look (indent 2, trailing newline), fsynced."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
