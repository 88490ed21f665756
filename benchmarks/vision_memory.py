"""Peak memory and time of the Qwen2-VL / Qwen2.5-VL vision tower, ours against transformers',
at 448, 896 and 1344 px square images (1024, 4096 and 9216 patches).

    python benchmarks/vision_memory.py [--family qwen2_vl|qwen2_5_vl] [--layers 4] [--sizes 448 896 1344]

The towers are random (no download) at the real widths: Qwen2-VL-2B's (embed 1280, 16
heads, MLP 5120, merger to 1536) or Qwen2.5-VL-3B's (hidden 1280, 16 heads, SwiGLU 3420,
112 px windows, merger to 2048), with --layers blocks instead of 32 (memory per forward
does not grow with depth: one block's activations live at a time; time does, linearly, so
the table gives it per block too). For Qwen2.5-VL the last of the --layers blocks attends
over the whole image, the others within windows, as one block in eight does in the model.

Each (implementation, size) runs in a fresh subprocess: build the tower in fp32, run a
small warm-up image, reset the peak (/proc/self/clear_refs), then one forward of the image
under inference_mode; it reports the resident memory before the forward and the peak
during it (VmHWM), and the wall time. The table shows the peak over that baseline: what the
forward itself needs on top of the weights.

Measured 2026-12-02 on an AMD EPYC (lscpu's model name), 2 threads, torch 2.13.0+cpu,
transformers 5.24.0 (sdpa), --layers 2, other jobs sharing the machine (times are rough):

    python benchmarks/vision_memory.py --layers 2     (Qwen2-VL-2B's tower)
    | image | patches | tokens | ours: peak over weights | transformers: peak over weights | ours: s (s/block) | transformers: s (s/block) |
    |---|---|---|---|---|---|---|
    | 448x448 | 1024 | 256 | 120 MiB | 122 MiB | 1.33 (0.66) | 2.03 (1.02) |
    | 896x896 | 4096 | 1024 | 218 MiB | 336 MiB | 5.47 (2.74) | 6.76 (3.38) |
    | 1344x1344 | 9216 | 2304 | 513 MiB | 763 MiB | 15.80 (7.90) | 17.23 (8.62) |

    python benchmarks/vision_memory.py --family qwen2_5_vl --layers 2     (Qwen2.5-VL-3B's)
    | image | patches | tokens | ours: peak over weights | transformers: peak over weights | ours: s (s/block) | transformers: s (s/block) |
    |---|---|---|---|---|---|---|
    | 448x448 | 1024 | 256 | 89 MiB | 72 MiB | 1.07 (0.53) | 1.08 (0.54) |
    | 896x896 | 4096 | 1024 | 266 MiB | 328 MiB | 4.66 (2.33) | 6.62 (3.31) |
    | 1344x1344 | 9216 | 2304 | 467 MiB | 589 MiB | 15.19 (7.59) | 14.44 (7.22) |
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("ours", "transformers")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _vision_dict(family: str, layers: int) -> dict:
    if family == "qwen2_vl":
        return dict(depth=layers, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu",
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return dict(depth=layers, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048, num_heads=16,
                hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                window_size=112, fullatt_block_indexes=[layers - 1])


def _build(impl: str, family: str, layers: int):
    """A callable (patches, grids) -> merged visual tokens."""
    import torch

    vision = _vision_dict(family, layers)
    if impl == "transformers":
        import transformers

        if family == "qwen2_vl":
            from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower

            cfg = transformers.Qwen2VLConfig(vision_config=vision).vision_config
        else:
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
                Qwen2_5_VisionTransformerPretrainedModel as Tower,
            )

            cfg = transformers.Qwen2_5_VLConfig(vision_config=vision).vision_config
        cfg._attn_implementation = "sdpa"
        model = Tower._from_config(cfg, dtype=torch.float32).eval()

        def run(patches, grids):
            return model(patches, grid_thw=torch.tensor(grids)).pooler_output

        return run
    from vlmcli.families.qwen2_vl.vision import PatchMerger, Qwen2VisionTower

    if family == "qwen2_vl":
        from vlmcli.families.qwen2_vl.config import vision_from_hf
    else:
        from vlmcli.families.qwen2_5_vl.config import vision_from_hf
    cfg = vision_from_hf(vision)
    tower, merger = Qwen2VisionTower(cfg).eval(), PatchMerger(cfg).eval()

    def run(patches, grids):
        return merger(tower(patches, grids))

    return run


def child(impl: str, family: str, layers: int, size: int) -> dict:
    import torch

    torch.manual_seed(0)
    run = _build(impl, family, layers)
    patch_dim = 3 * 2 * 14 * 14

    def forward(side: int):
        g = side // 14
        patches = torch.randn(g * g, patch_dim)
        return run(patches, [(1, g, g)])

    with torch.inference_mode():
        forward(224)  # warm-up: one-time allocations and kernels out of the measurement
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        baseline = _status("VmRSS")
        start = time.perf_counter()
        out = forward(size)
        seconds = time.perf_counter() - start
    return {"baseline": baseline, "peak": _status("VmHWM"), "seconds": seconds, "tokens": out.shape[0]}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("qwen2_vl", "qwen2_5_vl"), default="qwen2_vl")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 896, 1344])
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.family, args.layers, int(args.child[1]))))
        return
    import torch

    mib = 2**20
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print(f"{args.family} tower, {args.layers} blocks of the real width, fp32, one forward each\n")
    print("| image | patches | tokens | ours: peak over weights | transformers: peak over weights "
          "| ours: s (s/block) | transformers: s (s/block) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        rows = {}
        for impl in IMPLEMENTATIONS:
            cmd = [sys.executable, __file__, "--family", args.family, "--layers", str(args.layers), "--child", impl, str(size)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                sys.exit(f"{impl} at {size} px failed:\n{done.stderr}")
            rows[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        o, t = rows["ours"], rows["transformers"]
        extra = {k: (r["peak"] - r["baseline"]) / mib for k, r in rows.items()}
        print(f"| {size}x{size} | {(size // 14) ** 2} | {o['tokens']} | {extra['ours']:.0f} MiB | "
              f"{extra['transformers']:.0f} MiB | {o['seconds']:.2f} ({o['seconds'] / args.layers:.2f}) | "
              f"{t['seconds']:.2f} ({t['seconds'] / args.layers:.2f}) |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
