"""Checkpoint -> model: build on `meta`, then fill it tensor by tensor through the backend.

Nothing is allocated before the checkpoint's headers have been checked against the config
(every tensor present, every shape right), and each tensor is converted or quantized as it
streams out of the memory-mapped file, so peak memory stays near the final model size plus
one layer rather than a full-precision copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from backends.base import Backend
from vlmcli.checkpoint import WeightFiles, iter_tensors, read_config, tensor_shapes, weight_files
from vlmcli.config import MultiModalConfig
from vlmcli.errors import CheckpointError
from vlmcli.families import Family, family_for
from vlmcli.model.multimodal import VisionLanguageModel

ProgressFn = Callable[[int, int], None]  # (tensors done, tensors total)

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    config: MultiModalConfig
    family: Family
    folder: Path
    unused_tensors: list[str] = field(default_factory=list)  # in the checkpoint, not needed


def load_model(folder: Path, backend: Backend, progress: ProgressFn | None = None) -> LoadedModel:
    raw = read_config(folder)
    family = family_for(raw)
    cfg = MultiModalConfig.from_hf(raw)
    files = weight_files(folder)
    with torch.device("meta"):
        model = VisionLanguageModel(cfg)
    unused = _fill(model, files, family, backend, progress)
    if cfg.text.tie_word_embeddings:
        model.decoder.tie_weights()
    model.decoder.setup(backend.device)
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, family, folder, unused)


def _expected_parameters(model: VisionLanguageModel) -> dict[str, torch.Size]:
    expected = {name: p.shape for name, p in model.named_parameters()}
    if model.cfg.text.tie_word_embeddings:
        expected.pop("decoder.lm_head.weight")  # shared with embed_tokens
    return expected


def _plan(
    model: VisionLanguageModel, files: WeightFiles, family: Family
) -> tuple[dict[str, str], list[str]]:
    """Check the headers against the model: {checkpoint name: our name} and the unused names."""
    expected = _expected_parameters(model)
    plan, unused = {}, []
    for key, (shape, dtype) in tensor_shapes(files).items():
        name = family.canonical_name(key)
        if name not in expected:
            unused.append(key)
            continue
        if name in plan.values():
            raise CheckpointError(f"the checkpoint holds '{name}' twice (last as '{key}')")
        if shape != tuple(expected[name]):
            raise CheckpointError(
                f"tensor '{key}' has shape {list(shape)} but config.json implies "
                f"{list(expected[name])}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor '{key}' is {dtype}; expected a floating-point type")
        plan[key] = name
    missing = sorted(set(expected) - set(plan.values()))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors the config needs: "
            f"{', '.join(missing[:5])}{more}"
        )
    return plan, unused


def _fill(
    model: VisionLanguageModel,
    files: WeightFiles,
    family: Family,
    backend: Backend,
    progress: ProgressFn | None,
) -> list[str]:
    plan, unused = _plan(model, files, family)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # A Linear is handed to the backend once all its tensors have arrived (weight and bias
    # may sit in different shards).
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done = 0
    for key, tensor in iter_tensors(files):
        name = plan.get(key)
        if name is None:
            continue
        owner, _, attr = name.rpartition(".")  # owner "" is the model itself (image_newline)
        if owner in linears:
            parts = pending.setdefault(owner, {})
            parts[attr] = tensor
            needed = {"weight", "bias"} if linears[owner].bias is not None else {"weight"}
            if needed <= parts.keys():
                _replace_module(model, owner, backend.make_linear(owner, parts["weight"], parts.get("bias")))
                del pending[owner]
        else:
            module = model.get_submodule(owner)
            module._parameters[attr] = nn.Parameter(backend.place(name, tensor), requires_grad=False)
        done += 1
        if progress:
            progress(done, len(plan))
    return unused


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
