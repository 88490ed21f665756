"""`vlm info`: what a checkpoint is and what it would take to run, from config.json and the
safetensors headers alone (no weights are read)."""

from __future__ import annotations

from typing import Any


import backends
from vlmcli import checkpoint
from vlmcli.errors import UsageError
from vlmcli.families import parse_config
from vlmcli.loader import build_on_meta, expected_parameters, linear_modules, plan_load
from vlmcli.quantization import read_quantization

# The backends `vlm info` estimates, as `-b` spells them.
INFO_BACKENDS = ("cpu", "cpu-bf16", "cuda", "bf16", "int8", "int4", "q8", "q4")
KV_TOKENS = 1000  # the KV cache is shown per this many tokens of context

_STORED = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}


def model_info(ref: str, *, download_progress: bool = True, mmproj: str | None = None) -> dict[str, Any]:
    folder = checkpoint.resolve(ref, progress=download_progress, mmproj=mmproj)
    raw = checkpoint.read_config(folder)
    family, cfg = parse_config(raw)
    quant = read_quantization(raw)
    files = checkpoint.weight_files(folder)
    model = build_on_meta(family, cfg, False)
    plan = plan_load(model, files, family)  # also checks every header against the config
    expected = expected_parameters(model)
    linears = linear_modules(model)
    shapes = checkpoint.tensor_shapes(files)

    def count(prefix: str) -> int:
        return sum(s.numel() for n, s in expected.items() if n.startswith(prefix))

    params = {"vision": count("vision."), "projector": count("projector."), "decoder": count("decoder.")}
    params["total"] = sum(params.values())
    v, t, p = cfg.vision, cfg.text, cfg.projection
    dense_dtypes = sorted({_STORED.get(shapes[k][1], shapes[k][1]) for k in plan.params})
    info: dict[str, Any] = {
        "model": ref,
        "path": str(folder),
        "family": family.name,
        "model_type": cfg.model_type,
        "vision": {
            "type": v.model_type,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.d_vision,
            "layers": v.n_layers,
            "layers_used": cfg.vision_layers_needed(),
            "heads": v.n_heads,
            "feature_layers": list(cfg.vision_feature_layers),
            "select_strategy": cfg.vision_feature_select_strategy,
        },
        "projector": {"type": p.projection_type, "activation": p.activation, "in": p.d_vision, "out": p.d_language},
        "decoder": {
            "type": t.model_type,
            "layers": t.n_layers,
            "width": t.d_model,
            "heads": t.n_heads,
            "kv_heads": t.n_kv_heads,
            "mlp": t.d_ff,
            "vocab": t.vocab_size,
            "context": t.max_position_embeddings,
            "tied_embeddings": t.tie_word_embeddings,
        },
        "parameters": params,
        "image_tokens": cfg.max_visual_tokens(),
        "checkpoint": {
            "format": quant.describe() if quant else "/".join(dense_dtypes),
            "files": len(files.files),
            "bytes": sum(path.stat().st_size for path in files.files),
            "unused_tensors": len(plan.unused),
        },
        "backends": [],
    }
    if not isinstance(files, checkpoint.WeightFiles):  # a GGUF pair: what each part is stored as
        info["path"] = str(files.files[0])
        info["checkpoint"]["format"] = "GGUF " + "/".join(sorted({t for c in files.type_counts().values() for t in c}))
        info["checkpoint"]["gguf_types"] = {part: dict(sorted(c.items())) for part, c in files.type_counts().items()}
        info["checkpoint"]["gguf_groups"] = files.group_types()
    if family.name == "Language model":  # no vision tower or projector to describe
        info["vision"] = info["projector"] = None
        info["image_tokens"] = 0
    for spec in INFO_BACKENDS:
        row: dict[str, Any] = {"backend": spec}
        try:
            backend = backends.build(spec, quant)
        except UsageError as e:  # e.g. int4 asked for an int8 checkpoint
            row.update(available=False, reason=str(e))
            info["backends"].append(row)
            continue
        weights = 0
        for name, shape in expected.items():
            module = name.rpartition(".")[0]
            if module in linears and name.endswith(".weight"):
                lp = plan.linears[module]
                weights += backend.linear_bytes(module, *lp.shape, stored=lp.format)
            else:
                weights += shape.numel() * backend.dtype.itemsize
        kv = 2 * t.n_layers * t.n_kv_heads * t.head_dim * KV_TOKENS * backend.dtype.itemsize
        reason = backend.unavailable_reason()
        row.update(
            description=backend.description,
            device=backend.device.type,
            weights_bytes=weights,
            kv_cache_bytes_per_1k_tokens=kv,
            available=reason is None,
            reason=reason,
        )
        info["backends"].append(row)
    return info


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def human_count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    if n >= 10**3:
        return f"{n / 1e3:.1f}K"
    return str(n)
