"""Checkpoint -> model: build on `meta`, then fill it tensor by tensor through the backend.

Nothing is allocated before the checkpoint's headers have been checked against the config
(every tensor present, every shape right, each Linear layer either plain or stored in one
bitsandbytes format), and each tensor is converted or quantized as it streams out of the
file, so peak memory stays near the final model size plus one layer rather than a
full-precision copy of the model. A layer a bitsandbytes checkpoint stores quantized reaches
the backend as a QuantizedWeight (packed codes and their quantization state); so does one in
vlm's weight-only format (q8 / q4), but only for the backend of that format: any other gets
it dequantized here, once (plain arithmetic on its codes and scales, no bitsandbytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from backends.base import Backend, LinearWeight, dense_linear, release_freed_memory
from vlmcli.checkpoint import WeightFiles, iter_tensors, read_config, tensor_shapes, weight_files
from vlmcli.config import MultiModalConfig
from vlmcli.errors import CheckpointError
from vlmcli.families import Family, parse_config
from vlmcli.model.multimodal import VisionLanguageModel
from vlmcli.quantization import (
    FLOAT_DTYPES,
    LINEAR_PARTS,
    WEIGHT_ONLY_FORMATS,
    QuantizedWeight,
    concat_rows,
    layer_format,
)

ProgressFn = Callable[[int, int], None]  # (tensors done, tensors total)
TIED_EMBEDDING = "decoder.embed_tokens.weight"  # lm_head's weight too, when the config ties them


@dataclass
class LoadedModel:
    model: VisionLanguageModel
    config: MultiModalConfig
    family: Family
    folder: Path
    unused_tensors: list[str] = field(default_factory=list)  # in the checkpoint, not needed


def load_model(folder: Path, backend: Backend, progress: ProgressFn | None = None) -> LoadedModel:
    family, cfg = parse_config(read_config(folder))
    files = weight_files(folder)
    model = build_on_meta(family, cfg, False)
    unused = _fill(model, files, family, backend, progress)
    _fuse_projections(model, backend)
    model.decoder.setup(backend.device, backend.attention_dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, family, folder, unused)


def build_on_meta(family: Family, cfg: MultiModalConfig, full_vision: bool) -> VisionLanguageModel:
    """The model with placeholder parameters on `meta`, to be filled from the checkpoint.

    Their random initialisation is skipped: torch runs it even on `meta`, through Python
    decompositions (SmolLM2 LLaVA: 0.09 s for 274 tensors, to produce nothing)."""
    skipped = {name: fn for name, fn in vars(nn.init).items() if name.endswith("_") and not name.startswith("_") and callable(fn)}
    try:
        for name in skipped:
            setattr(nn.init, name, _no_init)
        with torch.device("meta"):
            return family.build(cfg, full_vision)
    finally:
        for name, fn in skipped.items():
            setattr(nn.init, name, fn)


def _no_init(tensor, *args, **kwargs):
    return tensor


def expected_parameters(model: VisionLanguageModel) -> dict[str, torch.Size]:
    expected = {name: p.shape for name, p in model.named_parameters()}
    if model.cfg.text.tie_word_embeddings:
        expected.pop("decoder.lm_head.weight")  # shared with embed_tokens
    return expected


@dataclass
class LinearPlan:
    """Where one Linear layer's tensors are in the checkpoint, and how they are stored."""

    shape: tuple[int, int]  # (out_features, in_features)
    keys: dict[str, str]  # part ("weight", "bias", "SCB", "weight.absmax", ...) -> checkpoint key
    format: str  # "dense" | "int8" | "nf4" | "fp4" | "q8" | "q4"


@dataclass
class LoadPlan:
    """The checkpoint checked against the model, from the safetensors headers alone."""

    params: dict[str, str]  # checkpoint key -> our parameter name (everything but Linear layers)
    linears: dict[str, LinearPlan]  # our module name -> its tensors
    unused: list[str]  # checkpoint keys the model does not need

    @property
    def owner(self) -> dict[str, tuple[str, str]]:
        """checkpoint key -> (Linear module name, part) for every Linear tensor."""
        return {key: (module, part) for module, lp in self.linears.items() for part, key in lp.keys.items()}

    @property
    def n_tensors(self) -> int:
        return len(self.params) + sum(len(lp.keys) for lp in self.linears.values())


def linear_modules(model: VisionLanguageModel) -> dict[str, nn.Linear]:
    """The Linear layers whose weights come from the checkpoint (a tied lm_head's does not)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if model.cfg.text.tie_word_embeddings:
        linears.pop("decoder.lm_head", None)  # its weight is embed_tokens'
    return linears


def _split_linear_key(name: str, linears: dict[str, nn.Linear]) -> tuple[str, str] | None:
    """'decoder.layers.0.mlp.up_proj.weight.absmax' -> ('decoder.layers.0.mlp.up_proj', 'weight.absmax')."""
    for part in LINEAR_PARTS:
        if name.endswith("." + part):
            module = name[: -len(part) - 1]
            if module in linears:
                return module, part
    return None


def plan_load(model: VisionLanguageModel, files: WeightFiles, family: Family) -> LoadPlan:
    """Check the headers against the model: every tensor present, every shape right, each
    Linear layer either plain or in one bitsandbytes format. Nothing is read but headers."""
    linears = linear_modules(model)
    expected = {n: s for n, s in expected_parameters(model).items() if n.rpartition(".")[0] not in linears}
    params: dict[str, str] = {}
    parts: dict[str, dict[str, tuple[tuple[int, ...], str, str]]] = {}
    unused: list[str] = []
    seen: dict[str, str] = {}
    for key, (shape, dtype) in tensor_shapes(files).items():
        name = family.weight_name(key)
        if name is None:
            unused.append(key)
            continue
        if name in seen:
            raise CheckpointError(f"the checkpoint holds '{name}' twice (last as '{key}')")
        if name in expected:
            if shape != tuple(expected[name]):
                raise CheckpointError(
                    f"tensor '{key}' has shape {list(shape)} but config.json implies "
                    f"{list(expected[name])}"
                )
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{key}' is {dtype}; expected a floating-point type")
            params[key] = name
        elif (split := _split_linear_key(name, linears)) is not None:
            module, part = split
            parts.setdefault(module, {})[part] = (shape, dtype, key)
        else:
            unused.append(key)
            continue
        seen[name] = key

    missing = sorted(set(expected) - set(params.values()))
    plans: dict[str, LinearPlan] = {}
    # Layers in the order their tensors appear, so the first bad tensor is the one reported.
    order = list(parts) + [m for m in linears if m not in parts]
    for module in order:
        layer, got = linears[module], parts.get(module, {})
        needed = ["weight"] + (["bias"] if layer.bias is not None else [])
        absent = [f"{module}.{p}" for p in needed if p not in got]
        if absent:
            missing.extend(absent)
            continue
        if "bias" in got and layer.bias is None:
            unused.append(got.pop("bias")[2])
        shape = (layer.out_features, layer.in_features)
        fmt = layer_format(module, got, shape)
        if "bias" in got:
            b_shape, b_dtype, b_key = got["bias"]
            if tuple(b_shape) != (layer.out_features,):
                raise CheckpointError(
                    f"tensor '{b_key}' has shape {list(b_shape)} but config.json implies [{layer.out_features}]"
                )
            if b_dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{b_key}' is {b_dtype}; expected a floating-point type")
        plans[module] = LinearPlan(shape, {p: k for p, (_, _, k) in got.items()}, fmt)
    if missing:
        missing.sort()
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} tensors the config needs: "
            f"{', '.join(missing[:5])}{more}"
        )
    return LoadPlan(params, plans, unused)


def _fill(
    model: VisionLanguageModel,
    files: WeightFiles,
    family: Family,
    backend: Backend,
    progress: ProgressFn | None,
) -> list[str]:
    plan = plan_load(model, files, family)
    owner = plan.owner
    # A Linear is handed to the backend once all its tensors have arrived (weight, bias and
    # quantization state may sit in different shards).
    pending: dict[str, dict[str, torch.Tensor]] = {}
    # A backend that keeps every weight plain gets q/k/v and gate/up as one fused weight
    # each, concatenated from the stored tensors: one copy into its layout, where fusing
    # after the fact copies each weight three times (SmolLM2 LLaVA: 0.45 s of a 1.3 s load).
    # So does a quantizing backend that asks for it (fuses_projections: backends/weight_only.py),
    # also from a checkpoint in its own format: the stored codes of the parts stacked by rows.
    groups = _fuse_groups(model) if backend.fuses_projections else {}
    arrived: dict[str, dict[str, tuple[LinearWeight, torch.Tensor | None]]] = {}
    done, total = 0, plan.n_tensors
    for key, tensor in iter_tensors(files):
        if key in plan.params:
            name = plan.params[key]
            module_name, _, attr = name.rpartition(".")  # "" is the model itself (image_newline)
            tied = name == TIED_EMBEDDING and model.cfg.text.tie_word_embeddings
            # a backend that quantizes lm_head gives it its own quantized copy (tied_head)
            head = backend.tied_head(tensor) if tied else None
            if tied and head is None:
                # lm_head is built from the stored tensor in one copy (never quantized: the
                # embedding needs the plain matrix) and the embedding reads its rows.
                model.decoder.tie_weights(dense_linear(tensor, None, backend.device, backend.dtype))
            else:
                module = model.get_submodule(module_name)
                module._parameters[attr] = nn.Parameter(backend.place(name, tensor), requires_grad=False)
                if head is not None:
                    model.decoder.lm_head = head
        elif key in owner:
            module_name, part = owner[key]
            lp = plan.linears[module_name]
            got = pending.setdefault(module_name, {})
            got[part] = tensor
            if len(got) == len(lp.keys):
                del pending[module_name]
                bias = got.pop("bias", None)
                weight = got["weight"] if lp.format == "dense" else QuantizedWeight(lp.format, lp.shape, got, module_name)
                weight = _as_backend_reads(weight, backend)
                if module_name in groups and _stackable(weight):
                    group = groups[module_name]
                    parts = arrived.setdefault(group.name, {})
                    parts[module_name] = (weight, bias)
                    if len(parts) == len(group.parts) and len({_kind(w) for w, _ in parts.values()}) == 1:
                        del arrived[group.name]
                        group.fuse(backend, [parts[m] for m in group.parts], family.keep_dense(group.parts[0]))
                else:
                    layer = backend.make_linear(module_name, weight, bias, keep_dense=family.keep_dense(module_name))
                    _replace_module(model, module_name, layer)
        else:
            continue
        done += 1
        if progress:
            progress(done, total)
    # a group some of whose parts are quantized in the checkpoint (bitsandbytes), or stored
    # in different forms: its parts one by one
    for parts in arrived.values():
        for module_name, (weight, bias) in parts.items():
            layer = backend.make_linear(module_name, weight, bias, keep_dense=family.keep_dense(module_name))
            _replace_module(model, module_name, layer)
    if groups and backend.device.type == "cpu":
        release_freed_memory()  # the concatenations' memory (see release_freed_memory)
    return plan.unused


def _as_backend_reads(weight: LinearWeight, backend: Backend) -> LinearWeight:
    """A layer stored in vlm's weight-only format goes as it is only to the backend of that
    format (q8, q4: `name` is the format); any other gets its float32 weight, dequantized
    here once (the backend then converts it as it would a full-precision one)."""
    if isinstance(weight, QuantizedWeight) and weight.format in WEIGHT_ONLY_FORMATS and weight.format != backend.name:
        from backends.weight_only import dequantize

        return dequantize(weight)
    return weight


def _stackable(weight: LinearWeight) -> bool:
    """Whether a layer can join its fused group: a plain weight, or weight-only codes (one row
    per output). bitsandbytes' 4-bit weights are packed across rows, so never."""
    return not isinstance(weight, QuantizedWeight) or weight.format in WEIGHT_ONLY_FORMATS


def _kind(weight: LinearWeight) -> str:
    return weight.format if isinstance(weight, QuantizedWeight) else "dense"


@dataclass
class FuseGroup:
    """Layers whose outputs one fused layer computes side by side (q/k/v, gate/up)."""

    name: str  # the fused layer's name, e.g. decoder.layers.0.self_attn.qkv_proj
    parts: list[str]  # the layers' names, in output order
    install: Callable[[nn.Module], None]  # the block's fuse_qkv / fuse_gate_up

    def fuse(
        self, backend: Backend, tensors: list[tuple[LinearWeight, torch.Tensor | None]], keep_dense: bool | None = True
    ) -> None:
        """keep_dense: the parts' word (one family rule covers a block's projections). The
        parts are all plain weights or all in one weight-only format."""
        weights = [w for w, _ in tensors]
        if isinstance(weights[0], QuantizedWeight):
            weight = concat_rows(weights, self.name)
        else:
            weight = torch.cat(weights)
        bias = None if tensors[0][1] is None else torch.cat([b for _, b in tensors])
        self.install(backend.make_linear(self.name, weight, bias, keep_dense=keep_dense))


def _fuse_groups(model: VisionLanguageModel) -> dict[str, FuseGroup]:
    """part layer name -> its group, for each decoder block."""
    groups: dict[str, FuseGroup] = {}
    for i, block in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{i}"
        for owner, fused, parts, install in (
            ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"), "fuse_qkv"),
            ("mlp", "gate_up_proj", ("gate_proj", "up_proj"), "fuse_gate_up"),
        ):
            module = getattr(block, owner, None)
            if module is None or not hasattr(module, install) or not all(hasattr(module, p) for p in parts):
                continue
            group = FuseGroup(f"{prefix}.{owner}.{fused}", [f"{prefix}.{owner}.{p}" for p in parts], getattr(module, install))
            groups.update({part: group for part in group.parts})
    return groups


def _fuse_projections(model: VisionLanguageModel, backend: Backend) -> None:
    """Each decoder block's q/k/v and gate/up as one product each, where the backend keeps
    them as plain weights: a decode step is ~100 small products, and each one saved is
    per-call overhead saved (SmolLM2 on 2 CPU cores: 40.2 -> 37.7 ms per step in fp32).
    The fused layer is materialized by the backend like any other (layout, dtype)."""
    for i, block in enumerate(model.decoder.layers):
        attn, mlp = block.self_attn, block.mlp
        prefix = f"decoder.layers.{i}"
        qkv = gate_up = None
        if hasattr(attn, "q_proj"):  # not fused while loading (see _fill)
            qkv = _fused(backend, f"{prefix}.self_attn.qkv_proj", [attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is not None:
                attn.fuse_qkv(qkv)
        if hasattr(mlp, "gate_proj"):
            gate_up = _fused(backend, f"{prefix}.mlp.gate_up_proj", [mlp.gate_proj, mlp.up_proj])
            if gate_up is not None:
                mlp.fuse_gate_up(gate_up)
        if backend.device.type == "cpu" and (qkv is not None or gate_up is not None):
            release_freed_memory()  # the parts' memory, before the next layer's copies


def _fused(backend: Backend, name: str, layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the outputs of `layers` side by side, or None when any of
    them is not a plain dense layer (bitsandbytes layers stay as they are)."""
    weights = [getattr(layer, "weight", None) for layer in layers]  # weight-only layers have none
    plain = (torch.Tensor, nn.Parameter)
    if not all(type(w) in plain and w.dtype.is_floating_point and not w.is_meta for w in weights):
        return None
    biases = [layer.bias for layer in layers]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    # the parts were kept dense (else they would not be plain weights): so is their fusion
    return backend.make_linear(name, torch.cat([w.detach() for w in weights]), bias, keep_dense=True)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
