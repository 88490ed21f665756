"""`vlm convert`: rewrite a checkpoint as int8 / nf4 / fp4 (bitsandbytes), q8 / q4 (vlm's
weight-only format, for the fast CPU backends) or fp16 / bf16.

A bitsandbytes output is what transformers' `save_pretrained` writes for a
bitsandbytes-quantized model (see vlmcli/quantization.py for the tensor names and
`quantization_config`), so transformers loads it as such, and `vlm` loads it without
quantizing again. A q8 / q4 output holds the codes and scales the q8 / q4 backends would
compute while loading the source with the same options (the layers chosen by the backend's
own rule, backends/weight_only.py), so `-b q8` / `-b q4` on it builds the very same layers;
transformers does not read that format.

    source tensors, streamed one at a time
      -> Linear layers of the decoder: quantized (or cast); everything else: cast or kept
      -> safetensors shards in a temporary folder beside OUTPUT
    + config.json with quantization_config, the tokenizer / template / preprocessor files,
      vlm_provenance.json (source, revision, tool version, date)
      -> loaded and run once, as `vlm describe` would (`verify`; ConvertOptions.verify)
      -> fsync, then renamed to OUTPUT in one step

A failure or Ctrl-C at any point leaves OUTPUT as it was and no temporary folder behind.
Memory holds one layer at a time (plus bitsandbytes' working copy of it), not the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from backends import bnb  # not bitsandbytes itself: that is imported when first used
from backends import weight_only
from vlmcli import __version__, checkpoint
from vlmcli.errors import UsageError, VlmError
from vlmcli.families import Family, parse_config
from vlmcli.loader import LinearPlan, LoadPlan, build_on_meta, plan_load
from vlmcli.quantization import (
    HF_LM_HEAD,
    WEIGHT_ONLY_FORMATS,
    Quantization,
    QuantizedWeight,
    read_quantization,
)

BNB_TARGETS = ("int8", "nf4", "fp4")
WEIGHT_ONLY_TARGETS = WEIGHT_ONLY_FORMATS  # q8, q4
TARGETS = (*BNB_TARGETS, *WEIGHT_ONLY_TARGETS, "fp16", "bf16")
PROVENANCE_NAME = "vlm_provenance.json"
DEFAULT_MAX_SHARD = "5GB"

_FLOAT_TARGETS = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Files never copied: weights are rewritten, config.json and the provenance file are
# written anew, and pickles and code are not ours to carry along.
_SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".py", ".pyc"}
_SKIP_NAMES = {"config.json", checkpoint.INDEX_NAME, PROVENANCE_NAME, "gguf_files.json"}  # the last: a GGUF pair's pointer
_SNAPSHOT = re.compile(r"[0-9a-f]{40}")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ConvertOptions:
    to: str
    double_quant: bool = False  # nf4 / fp4: quantize the per-block scales too
    threshold: float = 6.0  # int8: LLM.int8 outlier threshold, recorded in the config
    quantize_all: bool = False  # also the vision tower, projector and lm_head
    quantize_head: bool = False  # q8 / q4: lm_head too, the vision tower and projector not
    group: int | None = None  # q4: inputs per scale and offset (None: the q4 backend's default)
    max_shard_bytes: int = 5 * 10**9
    force: bool = False  # replace an existing OUTPUT
    verify: bool = True  # load the written model and run it once before it is moved into place


@dataclass
class ConvertResult:
    output: Path
    files: list[str]
    bytes_written: int
    quantized_layers: int
    unquantized_layers: int
    verified_with: str | None = None  # the backend the output was loaded and run with
    group: int | None = None  # q4: the group size written


def convert(
    source: str,
    output: Path,
    opts: ConvertOptions,
    *,
    progress: ProgressFn | None = None,
    download_progress: bool = True,
    mmproj: str | None = None,
) -> ConvertResult:
    """mmproj: the vision file of a GGUF SOURCE; a GGUF pair is written in the Hugging Face layout."""
    if opts.to not in TARGETS:
        raise UsageError(f"unknown --to '{opts.to}' (choose from: {', '.join(TARGETS)})")
    output = Path(output).expanduser()
    local = Path(source).expanduser()
    if local.is_dir():
        _refuse_same(local, output)
    _refuse_existing(output, opts.force)
    _weight_only_backend(opts)  # refuses --group / --quantize-head where they do not belong
    if opts.to == "q4" and opts.group is None:  # recorded as used (provenance)
        opts = dataclasses.replace(opts, group=weight_only.DEFAULT_GROUP)
    if opts.to in BNB_TARGETS and (reason := bnb.bnb_unavailable_reason()):
        raise UsageError(f"converting to {opts.to} needs bitsandbytes: {reason}")

    folder = checkpoint.resolve(source, progress=download_progress, mmproj=mmproj)
    _refuse_same(folder, output)
    raw = checkpoint.read_config(folder)
    family, cfg = parse_config(raw)
    source_quant = read_quantization(raw)
    if source_quant is not None and source_quant.bitsandbytes and (reason := bnb.bnb_unavailable_reason()):
        raise UsageError(f"the source is {source_quant.describe()}; reading it needs {reason}")
    # Plan over every block of the vision tower, not only those a LLaVA runs: the output
    # must hold (and quantize alike) everything transformers will look for.
    model = build_on_meta(family, cfg, True)
    files = checkpoint.weight_files(folder)
    plan = plan_load(model, files, family)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        tied = cfg.text.tie_word_embeddings
        result = _write(folder, files, plan, family, raw, tied, source, source_quant, tmp, opts, progress)
        if opts.verify:
            result.verified_with = verify(tmp, output)
        _sync_dir(tmp)
        _move_into_place(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise VlmError(f"could not write {output}: {e.strerror or e}") from None
        raise
    result.output = output
    result.group = opts.group if opts.to == "q4" else None
    return result


def verify(folder: Path, output: Path) -> str:
    """Load the model just written to `folder` as `vlm describe` would (the loader, with the
    backend its format runs on: int8 / int4 for a bitsandbytes checkpoint, q8 / q4 for a
    weight-only one, fp32 on the CPU for the others) and run it once (a prefill of two token
    ids, then one decode step). A failure is a one-line VlmError naming the step; `output` is
    what the message calls the result. Returns the backend's name."""
    import gc

    import backends
    from backends.base import release_freed_memory
    from vlmcli.loader import load_model

    quant = read_quantization(checkpoint.read_config(folder))
    backend = backends.get_backend("auto" if quant is not None else "cpu", quant)
    kept = "was left as it was" if output.exists() else "was not written"
    step = [f"loading it with -b {backend.name}"]
    try:
        _load_and_run(folder, backend, load_model, step)
    except VlmError as e:
        raise VlmError(f"the converted model failed its check, {step[0]}: {e}; {output} {kept}") from None
    except Exception as e:  # whatever broke, the output is not moved into place
        raise VlmError(f"the converted model failed its check, {step[0]}: {type(e).__name__}: {e}; {output} {kept}") from e
    finally:  # the model is gone with _load_and_run's frame; its memory goes back now
        gc.collect()
        release_freed_memory()
    return backend.name


def _load_and_run(folder: Path, backend, load_model, step: list[str]) -> None:
    loaded = load_model(folder, backend)
    step[0] = f"running it with -b {backend.name}"
    model, cfg = loaded.model, loaded.config
    ids = [i for i in range(min(cfg.text.vocab_size, 3)) if i != cfg.image_token_id][:2] or [0]
    with torch.inference_mode():
        cache = model.new_cache(len(ids) + 1)
        logits = model.prefill(torch.tensor([ids], device=backend.device), None, cache)
        _check_finite(logits, "the first forward pass")
        token = logits.argmax(-1, keepdim=True)
        _check_finite(model.step(token, len(ids), cache), "a decode step")


def _check_finite(logits: torch.Tensor, what: str) -> None:
    if not torch.isfinite(logits).all():
        raise VlmError(f"{what} gives logits that are not finite (NaN or inf)")


def _refuse_same(source: Path, output: Path) -> None:
    src, out = source.resolve(), output.resolve()
    if src == out:
        raise UsageError("OUTPUT is the SOURCE folder; write the converted model to a new folder")
    if out in src.parents:
        raise UsageError(f"OUTPUT '{output}' contains the source model; choose another folder")


def _refuse_existing(output: Path, force: bool) -> None:
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise UsageError(f"'{output}' already exists (pass --force to replace it)")
    if not output.is_dir() or output.is_symlink():
        raise UsageError(f"'{output}' is not a folder; refusing to replace it")
    if any(output.iterdir()) and not (output / "config.json").exists():
        raise UsageError(f"'{output}' is not a model folder (no config.json); refusing to replace it")


def _storage_dtype(files: checkpoint.WeightFiles, plan: LoadPlan) -> torch.dtype:
    """The dtype the source keeps its unquantized tensors in (that of its embeddings)."""
    shapes = checkpoint.tensor_shapes(files)
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float32}
    biggest = max(plan.params, key=lambda k: math.prod(shapes[k][0]), default=None)
    return names.get(shapes[biggest][1], torch.float32) if biggest else torch.float32


def _write(
    folder: Path,
    files: checkpoint.WeightFiles,
    plan: LoadPlan,
    family: Family,
    raw: dict,
    tied: bool,
    source_ref: str,
    source_quant: Quantization | None,
    out: Path,
    opts: ConvertOptions,
    progress: ProgressFn | None,
) -> ConvertResult:
    quantized_target = opts.to in BNB_TARGETS
    float_dtype = _FLOAT_TARGETS.get(opts.to) or _storage_dtype(files, plan)
    weight_only_target = _weight_only_backend(opts)

    def quantizes(module: str) -> bool:
        return quantized_target and (opts.quantize_all or not family.keep_dense(module))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(float_dtype) if t.is_floating_point() else t

    owner = plan.owner
    writer = checkpoint.ShardedWriter(out, opts.max_shard_bytes)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    n_quantized = n_kept = 0
    total = len(checkpoint.tensor_shapes(files))
    for done, (key, tensor) in enumerate(checkpoint.iter_tensors(files), start=1):
        if key not in owner:  # not a Linear layer (or not one we model): cast floats, keep the rest
            writer.add(key, cast(tensor))
        else:
            module, part = owner[key]
            lp = plan.linears[module]
            got = pending.setdefault(module, {})
            got[part] = tensor
            if len(got) == len(lp.keys):
                del pending[module]
                prefix = lp.keys["weight"][: -len(".weight")]
                bias = got.pop("bias", None)
                if bias is not None:
                    writer.add(lp.keys["bias"], cast(bias))
                nested = "weight.nested_absmax" in got
                if weight_only_target is not None:
                    tensors, quantized = _weight_only_layer(module, lp, got, weight_only_target, family, cast)
                elif quantizes(module) and lp.format == opts.to and (opts.to == "int8" or nested == opts.double_quant):
                    tensors, quantized = got, True  # already in the asked format: copied, not quantized twice
                else:
                    weight = _float_weight(module, lp, got)
                    quantized = quantizes(module)
                    if quantized:
                        source_dtype = got["weight"].dtype if lp.format == "dense" else float_dtype
                        tensors = bnb.quantize(weight.to(source_dtype), opts.to, opts.double_quant).tensors
                    else:
                        tensors = {"weight": cast(weight)}
                for part_name, value in tensors.items():
                    writer.add(f"{prefix}.{part_name}", value)
                if quantized:
                    n_quantized += 1
                else:
                    n_kept += 1
        if progress:
            progress(done, total)
    written = writer.close()

    config = {k: v for k, v in raw.items() if k != "quantization_config"}
    dtype_name = str(float_dtype).removeprefix("torch.")
    _set_dtype(config, dtype_name)
    if quantized_target or weight_only_target is not None:
        config["quantization_config"] = _quantization(opts, dtype_name, tied, family, weight_only_target).to_config()
    checkpoint.write_json(out / "config.json", config)
    copied = _copy_side_files(folder, out)
    checkpoint.write_json(out / PROVENANCE_NAME, _provenance(folder, source_ref, source_quant, opts))
    names = sorted([p.name for p in written] + ["config.json", PROVENANCE_NAME] + copied)
    return ConvertResult(out, names, writer.total_size, n_quantized, n_kept)


def _weight_only_backend(opts: ConvertOptions) -> weight_only.WeightOnlyBackend | None:
    """The q8 / q4 backend whose rule and quantizer the output follows (None for the other
    targets); UsageError for options of the wrong target or a group the kernel lacks."""
    if opts.group is not None and opts.to != "q4":
        raise UsageError("--group goes with --to q4")
    if opts.quantize_head and opts.to not in WEIGHT_ONLY_TARGETS:
        raise UsageError("--quantize-head goes with --to q8 or q4 (with bitsandbytes formats, use --quantize-all)")
    if opts.to == "q8":
        return weight_only.Q8Backend(quantize_all=opts.quantize_all, quantize_head=opts.quantize_head)
    if opts.to == "q4":
        group = weight_only.DEFAULT_GROUP if opts.group is None else opts.group
        return weight_only.Q4Backend(group=group, quantize_all=opts.quantize_all, quantize_head=opts.quantize_head)
    return None


def _float_weight(module: str, lp: LinearPlan, got: dict[str, torch.Tensor]) -> torch.Tensor:
    """A source layer's weight in full precision: as stored, or dequantized."""
    if lp.format == "dense":
        return got["weight"]
    stored = QuantizedWeight(lp.format, lp.shape, got, module)
    return weight_only.dequantize(stored) if lp.format in WEIGHT_ONLY_FORMATS else bnb.dequantize(stored)


def _weight_only_layer(
    module: str,
    lp: LinearPlan,
    got: dict[str, torch.Tensor],
    backend: weight_only.WeightOnlyBackend,
    family: Family,
    cast: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors to write for layer `module`, whether quantized), as the q8 / q4 backend would
    build the layer while loading the source: the same layers chosen, the same codes."""
    if not backend.will_quantize(module, *lp.shape, keep_dense=family.keep_dense(module)):
        return {"weight": cast(_float_weight(module, lp, got))}, False
    if lp.format == backend.name and _same_group(lp, got, backend):
        return got, True  # already in this format: copied, not quantized twice
    return backend.stored_tensors(_float_weight(module, lp, got)), True


def _same_group(lp: LinearPlan, got: dict[str, torch.Tensor], backend: weight_only.WeightOnlyBackend) -> bool:
    if lp.format != "q4":
        return True
    return lp.shape[1] // got["weight_scale"].shape[1] == backend.group


def _quantization(
    opts: ConvertOptions, dtype_name: str, tied: bool, family: Family,
    weight_only_target: weight_only.WeightOnlyBackend | None = None,
) -> Quantization:
    skip: list[str] = []
    if not opts.quantize_all:
        skip += list(family.hf_skip_modules)
    head = weight_only_target.quantize_head if weight_only_target is not None else opts.quantize_all
    # a tied lm_head shares the (unquantized) embeddings; q8 / q4 quantize it while loading
    if not head or tied:
        skip.append(HF_LM_HEAD)
    if weight_only_target is not None:
        group = weight_only_target.group if isinstance(weight_only_target, weight_only.Q4Backend) else None
        return Quantization(opts.to, skip_modules=tuple(skip), group=group, quantize_head=head)
    if opts.to == "int8":
        return Quantization("int8", threshold=opts.threshold, compute_dtype=dtype_name, skip_modules=tuple(skip))
    return Quantization(
        "int4", quant_type=opts.to, double_quant=opts.double_quant, threshold=opts.threshold,
        compute_dtype=dtype_name, skip_modules=tuple(skip),
    )


def _set_dtype(config: dict, dtype_name: str) -> None:
    """Record the unquantized dtype where the source kept it (`dtype`, or the older `torch_dtype`)."""
    for cfg in (config, config.get("text_config"), config.get("vision_config")):
        if not isinstance(cfg, dict):
            continue
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = dtype_name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = dtype_name


def _copy_side_files(folder: Path, out: Path) -> list[str]:
    """Tokenizer, chat template, preprocessor and generation settings, model card: every
    top-level file that is not weights, code or a file written anew."""
    copied = []
    for path in sorted(folder.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith(".")
            or path.suffix in _SKIP_SUFFIXES
            or path.name in _SKIP_NAMES
        ):
            continue
        with open(path, "rb") as src, open(out / path.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        copied.append(path.name)
    return copied


def _provenance(folder: Path, source_ref: str, source_quant: Quantization | None, opts: ConvertOptions) -> dict:
    local = Path(source_ref).expanduser()
    _, revision = checkpoint.parse_model_ref(source_ref)
    # A hub download lives in .../snapshots/<commit>/: the commit pins exactly what was read.
    commit = folder.name if _SNAPSHOT.fullmatch(folder.name) and folder.parent.name == "snapshots" else None
    record = {
        "tool": f"vlm {__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(local.resolve()) if local.is_dir() else source_ref,
        "revision": None if local.is_dir() else revision,
        "commit": commit,
        "source_format": source_quant.format if source_quant else "unquantized",
        "to": opts.to,
        "options": {
            "double_quant": opts.double_quant,
            "threshold": opts.threshold,
            "quantize_all": opts.quantize_all,
            "quantize_head": opts.quantize_head,
            "group": opts.group,
            "max_shard_bytes": opts.max_shard_bytes,
        },
    }
    previous = folder / PROVENANCE_NAME
    if previous.exists():
        record["previous"] = checkpoint.read_json(previous)
    return record


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished folder to OUTPUT; an existing OUTPUT (with --force) is moved aside
    first and deleted only once the new one is in place."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / output.name)
    tmp.chmod(0o755)  # mkdtemp made it private; the result is an ordinary folder
    try:
        tmp.rename(output)
    except BaseException:
        if old is not None:  # put the previous OUTPUT back
            (old / output.name).rename(output)
            old.rmdir()
        raise
    _sync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
