"""A GGUF model (and its mmproj) presented as what every command already reads: a Hugging
Face model folder.

`present(model, mmproj)` writes, into a temporary folder of the process, the small files
of that layout, derived from the GGUF metadata: config.json (LLaVA with an mmproj, else
the decoder's own model_type), tokenizer.json + tokenizer_config.json (built from
`tokenizer.ggml.*`), chat_template.jinja (`tokenizer.chat_template`),
preprocessor_config.json (the mmproj's image statistics) and generation_config.json. No
weights: `gguf_files.json` names the GGUF files, and checkpoint.weight_files() answers
for such a folder with a GGUFWeights, whose tensor_shapes() / iter_tensors() give the
Hugging Face names and tensors (float as stored, quantized ones dequantized one tensor at
a time) that the loader's plan, fill and fusing consume unchanged.

The folder lives as long as the process (bench's child processes read it too) and is
removed at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from vlmcli.errors import CheckpointError, UsageError
from vlmcli.gguf import mmproj as mm
from vlmcli.gguf import text
from vlmcli.gguf.reader import FLOAT_TYPES, GGUFFile, check_readable, open_gguf
from vlmcli.gguf.tokenizer import build_tokenizer

MARKER = "gguf_files.json"
IMAGE_TOKEN = "<image>"


def is_gguf(path: Path) -> bool:
    """A .gguf name, or a file that starts as GGUF does: Ollama keeps its models as
    ~/.ollama/models/blobs/sha256-..., with no suffix."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a folder, a hub id, a missing path
        return False


def find_pair(folder: Path) -> tuple[Path, Path | None]:
    """The language model and mmproj GGUF files of a folder holding one of each (or one model)."""
    files = sorted(p for p in folder.iterdir() if is_gguf(p) and p.is_file())
    projectors = [p for p in files if _architecture(p) == "clip"]
    models = [p for p in files if p not in projectors]
    if len(models) != 1 or len(projectors) > 1:
        found = ", ".join(p.name for p in files) or "none"
        raise UsageError(
            f"{folder} should hold one GGUF model and at most one mmproj file (found: {found}); "
            f"give them as -m MODEL.gguf --mmproj MMPROJ.gguf"
        )
    return models[0], (projectors[0] if projectors else None)


def _architecture(path: Path) -> str | None:
    try:
        return open_gguf(path).architecture
    except CheckpointError:
        return None


def require_vision(ref: str, mmproj: str | None) -> None:
    """A GGUF model given without its mmproj, where the command needs images: one line, now."""
    if mmproj is not None:
        return
    local = Path(ref).expanduser()
    if is_gguf(local) and local.is_file():
        model = local
    elif local.is_dir() and not (local / "config.json").exists() and any(is_gguf(p) for p in local.iterdir()):
        model, found = find_pair(local)
        if found is not None:
            return
    else:
        return
    raise CheckpointError(
        f"{model.name} is a language model only; images need its vision projector: add --mmproj MMPROJ.gguf"
    )


_presented: dict[tuple, Path] = {}


def present(model: Path, mmproj: Path | None) -> Path:
    """The Hugging Face folder for this pair (made once per process and pair)."""
    model = Path(model).expanduser()
    mmproj = None if mmproj is None else Path(mmproj).expanduser()
    for path, what in ((model, "model"), (mmproj, "mmproj")):
        if path is not None and not path.is_file():
            raise UsageError(f"the {what} file {path} does not exist")
    key = tuple(str(p.resolve()) if p else None for p in (model, mmproj))
    stamp = key + tuple((p.stat().st_size, p.stat().st_mtime_ns) if p else None for p in (model, mmproj))
    if stamp in _presented and (_presented[stamp] / MARKER).exists():
        return _presented[stamp]
    lm = open_gguf(model)
    text_cfg = text.text_config(lm)
    files = {"model": key[0], "mmproj": key[1]}
    image_token = None
    proj = None
    if mmproj is not None:
        proj = open_gguf(mmproj)
        config = mm.vision_config(proj, text_cfg)
        image_token = IMAGE_TOKEN
    tokenizer, tok_config = build_tokenizer(lm, image_token=image_token)
    if proj is not None:
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        config.update(text_config=text_cfg, image_token_index=image_id,
                      tie_word_embeddings=text_cfg["tie_word_embeddings"])
    else:
        config = dict(text_cfg)
    # named as the model file, which notices about the folder then name
    folder = _workdir() / hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12] / model.stem
    folder.mkdir(parents=True)
    _write_json(folder / "config.json", config)
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tok_config)
    template = lm.get("tokenizer.chat_template")
    if isinstance(template, str) and proj is not None and "image" not in template:
        # A language model's own template takes string contents, and has no place for the
        # images llama.cpp splices in itself; the family's (for this decoder) writes them.
        from vlmcli.families import parse_config

        family, parsed = parse_config(config)
        template = family.chat_template(parsed)
        files["notes"] = [f"{model.name}'s chat template has no place for images; using the {family.name} default"]
    if isinstance(template, str):
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    if proj is not None:
        _write_json(folder / "preprocessor_config.json", mm.image_processor(proj, config))
    # the end of a turn may be its own token (tokenizer.ggml.eot_token_id: <|im_end|>, <|eot_id|>)
    eos = [i for i in (text_cfg.get("eos_token_id"), lm.get("tokenizer.ggml.eot_token_id")) if isinstance(i, int)]
    _write_json(folder / "generation_config.json", {"eos_token_id": eos})
    _write_json(folder / MARKER, files)  # last: the folder is complete once it is there
    _presented[stamp] = folder
    return folder


_workdir_path: list[Path] = []


def _workdir() -> Path:
    if not _workdir_path:
        path = Path(tempfile.mkdtemp(prefix="vlm-gguf-"))
        atexit.register(shutil.rmtree, path, True)
        _workdir_path.append(path)
    return _workdir_path[0]


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- weights -------------------------------------------------------------------------------


@dataclass
class GGUFWeights:
    """The tensors of a presented pair under their Hugging Face names (what
    checkpoint.weight_files gives for a presented folder)."""

    model: GGUFFile
    mmproj: GGUFFile | None
    config: dict[str, Any]
    names: dict[str, tuple[GGUFFile, str]] = field(default_factory=dict)  # HF name -> (file, GGUF name)

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(f.path for f in (self.model, self.mmproj) if f is not None)

    def __post_init__(self) -> None:
        for name in self.model.tensors:
            hf = self._decoder_name(name)
            if hf is not None:
                self.names[hf] = (self.model, name)
        if self.mmproj is not None:
            for name in self.mmproj.tensors:
                hf = mm.hf_name(self.mmproj, name)
                if hf is not None:
                    self.names[hf] = (self.mmproj, name)
        for file, name in self.names.values():  # an unreadable type fails before anything loads
            check_readable(file, name)

    def _decoder_name(self, name: str) -> str | None:
        """A causal LM's names (model.*, lm_head), or llava-hf's (language_model.model.*,
        language_model.lm_head) when the pair is a LLaVA."""
        hf = text.hf_name(name)
        if hf is None:
            return None
        hf = hf if hf == "lm_head.weight" else "model." + hf
        return "language_model." + hf if self.mmproj is not None else hf

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """HF name -> (shape, dtype as the loader will receive it: quantized types arrive as F32)."""
        out = {}
        for hf, (file, name) in self.names.items():
            info = file.tensors[name]
            dtype = info.type_name if info.type_name in FLOAT_TYPES else "F32"
            out[hf] = (info.shape, dtype)
        return out

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        arch = self.model.architecture
        text_cfg = self.config.get("text_config", self.config)
        for hf, (file, name) in self.names.items():
            tensor = file.read(name)
            if file is self.model:
                tensor = text.undo_rewrites(arch, name, tensor, text_cfg)
            yield hf, tensor

    def _part(self, hf: str, file: GGUFFile) -> str:
        return "decoder" if file is self.model else ("projector" if hf.startswith("multi_modal_projector") else "vision")

    def type_counts(self) -> dict[str, Counter]:
        """part (decoder / vision / projector) -> ggml type -> how many tensors."""
        parts: dict[str, Counter] = {}
        for hf, (file, name) in self.names.items():
            parts.setdefault(self._part(hf, file), Counter())[file.tensors[name].type_name] += 1
        return parts

    def group_types(self) -> dict[str, dict[str, dict[str, int]]]:
        """part -> tensor group (llama.cpp's name without block number and suffix: attn_q,
        ffn_down, token_embd ...) -> ggml type -> how many tensors. K-quant mixes (Q4_K_M)
        store groups in different types (attn_v and ffn_down in Q6_K, say)."""
        out: dict[str, dict[str, Counter]] = {}
        for hf, (file, name) in self.names.items():
            group = re.sub(r"^(v\.)?(blk\.\d+\.)?", "", name).removesuffix(".weight").removesuffix(".bias")
            out.setdefault(self._part(hf, file), {}).setdefault(group, Counter())[file.tensors[name].type_name] += 1
        return {part: {g: dict(sorted(c.items())) for g, c in groups.items()} for part, groups in out.items()}

    def quantized(self) -> Counter:
        """ggml type -> tensors that will be dequantized."""
        counts: Counter = Counter()
        for per_part in self.type_counts().values():
            counts.update({t: n for t, n in per_part.items() if t not in FLOAT_TYPES})
        return counts


def gguf_files(folder: Path) -> tuple[Path, Path | None]:
    """The model and mmproj files a folder made by present() stands for."""
    files = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    return Path(files["model"]), Path(files["mmproj"]) if files.get("mmproj") else None


def weights_of(folder: Path) -> GGUFWeights:
    """The GGUFWeights of a folder made by present()."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model, mmproj = gguf_files(folder)
    return GGUFWeights(open_gguf(model), open_gguf(mmproj) if mmproj else None, config)


def is_presented(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def load_notices(folder: Path, dtype: torch.dtype) -> list[str]:
    """Lines for stderr about loading a presented pair: what was made of its chat template,
    and what will be dequantized. None for a Hugging Face folder."""
    if not is_presented(folder):
        return []
    notes = list(json.loads((folder / MARKER).read_text(encoding="utf-8")).get("notes", []))
    counts = weights_of(folder).quantized()
    if counts:
        types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        name = str(dtype).removeprefix("torch.")
        notes.append(f"dequantizing {types} tensors to {name}, one at a time (repacking them for int8/int4 backends is not done yet)")
    return notes
