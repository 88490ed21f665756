"""`vlm bench`'s measurements: one backend, in this process, stage by stage.

ru_maxrss is the peak of the whole process's lifetime, so a peak that means anything needs
one fresh process per backend; the CLI starts one for each and calls `run_bench` there.
"""

from __future__ import annotations

import io
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

SYNTHETIC_SIZE = (640, 480)
SYNTHETIC_NAME = f"synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]}"
WARMUP_TOKENS = 2


def synthetic_image(size: tuple[int, int] = SYNTHETIC_SIZE, seed: int = 0) -> bytes:
    """A deterministic PNG (a colour gradient with seeded shapes on it), so that a benchmark
    needs no file and every backend, and every run, sees the same picture."""
    w, h = size
    ramp = Image.linear_gradient("L")  # 256x256, black at the top to white at the bottom
    red = ramp.resize((w, h))
    green = ramp.rotate(90).resize((w, h))
    blue = ramp.rotate(45).resize((w, h))
    img = Image.merge("RGB", (red, green, blue))
    draw = ImageDraw.Draw(img)
    rng = random.Random(seed)
    for _ in range(24):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(20, w // 3), y0 + rng.randrange(20, h // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def machine_info() -> dict:
    """What a reader needs to compare two benchmark results."""
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run_bench(
    model_ref: str,
    backend_spec: str,
    image: str | Path | bytes | None,
    prompt: str,
    tokens: int,
    runs: int,
) -> dict:
    """Load `model_ref` on `backend_spec`, warm up, then time `runs` greedy describes of
    `image` (None: the synthetic picture) producing up to `tokens` tokens each.

    Times are medians over the runs. Errors (VlmError, out of memory) propagate."""
    from vlmcli.cli.common import set_threads

    set_threads()  # $VLM_THREADS or the physical cores, as every command; machine_info shows it
    if image is None:
        image = synthetic_image()
    t0 = time.perf_counter()
    pipe = Pipeline.load(model_ref, backend_spec, download_progress=False)
    load_s = time.perf_counter() - t0

    # The first call pays for one-time work (allocator growth, kernel selection, lazy CUDA
    # init), which is not what a user waits for on every image.
    pipe.describe([image], prompt, SamplingOptions(max_new_tokens=WARMUP_TOKENS, temperature=0))

    opts = SamplingOptions(max_new_tokens=tokens, temperature=0)
    stages: dict[str, list[float]] = {
        name: [] for name in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")
    }
    for _ in range(runs):
        start = time.perf_counter()
        # TTFT: from the call to the first token chosen (Timings.first_token_at), so it
        # includes the steps between the stages (tokenizing, building the sequence, sampling)
        # that a sum of the stage times leaves out.
        answer = pipe.describe([image], prompt, opts)
        t = answer.timings
        stages["preprocess_ms"].append(t.preprocess_ms)
        stages["vision_ms"].append(t.vision_ms)
        stages["prefill_ms"].append(t.prefill_ms)
        stages["ttft_ms"].append((t.first_token_at - start) * 1000)
        if t.decode_tokens:  # none when one token was asked for or the second one stopped
            stages["decode_tokens_per_s"].append(t.decode_tokens_per_s)

    on_cuda = pipe.backend.device.type == "cuda"
    return {
        "backend": backend_spec,
        "runs_as": pipe.backend.name,
        "device": str(pipe.backend.device),
        "dtype": str(pipe.backend.dtype).removeprefix("torch."),
        "ok": True,
        "load_s": round(load_s, 3),
        **{name: median(values) for name, values in stages.items()},
        # greedy decoding: every run produces the same tokens, so the last run speaks for all
        "tokens": len(answer.tokens),
        "finish_reason": answer.finish_reason,
        "prompt_tokens": answer.prompt_tokens,
        "image_tokens": answer.image_tokens,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
    }
