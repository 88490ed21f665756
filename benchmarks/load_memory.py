"""Peak memory while loading, per backend: does quantizing while loading stay near the
quantized size, or does it hold a full-precision copy first?

    python benchmarks/load_memory.py [--model DIR] [-b cpu -b int8 ...] [--keep]

Without --model it builds a random LLaVA once with transformers (CLIP ViT-L/14-336 tower, a
~0.5B Llama decoder: 24 layers of width 1024, MLP 4096, vocab 32000), stored in fp16 in
500 MB shards as hub repos are, and reuses it from ~/.cache/vlmcli-bench on later runs.
Each backend loads in a fresh subprocess, which reports its resident memory before the load
(torch, bitsandbytes and vlm imported) and its peak (VmHWM) and resident size after; the
table shows what the load added to the baseline, next to `vlm info`'s estimate of the
weights. Needs transformers (for the build) and about 3 GB of free memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path.home() / ".cache" / "vlmcli-bench" / "llava-0.5b-fp16"
BACKENDS = ("cpu", "cpu-bf16", "int8", "int4", "int4:dq")


def build(out: Path) -> Path:
    """A random LLaVA with a ~0.5B decoder, written by transformers in fp16."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if (out / "config.json").exists():
        return out
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999, image_seq_length=576)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="500MB")
    tmp.rename(out)
    return out


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(folder: str, spec: str) -> None:
    """Runs in the subprocess: import, note the baseline, load, report."""
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401

    import backends
    from vlmcli.loader import load_model

    backend = backends.get_backend(spec)
    if spec.startswith("int"):
        from backends.bnb import _bnb

        _bnb()  # import bitsandbytes before the baseline: its import is not the load's cost
    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    loaded = load_model(Path(folder), backend)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "baseline": baseline,
        "peak": _status("VmHWM"),
        "after": _status("VmRSS"),
        "seconds": seconds,
        "params": sum(p.numel() for p in loaded.model.parameters()),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: build the random 0.5B LLaVA)")
    parser.add_argument("-b", "--backend", action="append", help=f"backends to measure (default: {', '.join(BACKENDS)})")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    folder = args.model or build(DEFAULT_DIR)
    sys.path.insert(0, str(ROOT))
    from vlmcli.info import human_bytes, model_info

    info = model_info(str(folder), download_progress=False)
    estimates = {r["backend"]: r.get("weights_bytes") for r in info["backends"]}
    size = info["checkpoint"]["bytes"]
    print(f"{folder}: {info['parameters']['total'] / 1e6:.0f}M parameters used, checkpoint "
          f"{info['checkpoint']['format']} {human_bytes(size)} in {info['checkpoint']['files']} files")
    print(f"{'backend':10} {'load s':>7} {'baseline':>10} {'peak':>10} {'peak-base':>10} {'after-base':>11} {'estimate':>10}")
    for spec in args.backend or BACKENDS:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), spec], capture_output=True, text=True, cwd=ROOT
        )
        if proc.returncode:
            print(f"{spec:10} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        name = spec.split(":")[0]
        estimate = estimates.get(name) if ":" not in spec else None
        print(
            f"{spec:10} {r['seconds']:7.1f} {human_bytes(r['baseline']):>10} {human_bytes(r['peak']):>10} "
            f"{human_bytes(r['peak'] - r['baseline']):>10} {human_bytes(r['after'] - r['baseline']):>11} "
            f"{human_bytes(estimate) if estimate else '-':>10}"
        )


if __name__ == "__main__":
    main()
