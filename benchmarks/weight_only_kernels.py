"""What one decode step's matrix-vector products cost with each CPU weight format.

    python benchmarks/weight_only_kernels.py [--model smollm2|qwen2-0.5b]

For the decoder of SmolLM2-135M or Qwen2-0.5B (the default model's), times a batch-1
product with every Linear shape of a layer, times the layer count, plus lm_head, for:
    fp32            vlm's `cpu` backend (the layout dense_linear picks)
    bf16            vlm's `cpu-bf16` backend
    bnb int8        bitsandbytes Linear8bitLt (LLM.int8, threshold 6): vlm's and transformers' `int8`
    bnb nf4         bitsandbytes Linear4bit (nf4, blocks of 64): vlm's and transformers' `int4`
    q8              vlm's `q8` layer: torch._weight_int8pack_mm (per-channel int8, bf16 in/out)
    q4 g32, q4 g64  vlm's `q4` layer: torch._weight_int4pack_mm_for_cpu (int4 in groups of 32
                    (the default) or 64, bf16 in/out); see backends/weight_only.py
The shapes are the fused ones vlm runs (q|k|v and gate|up as one product each: what the
loader hands every backend but bitsandbytes'). Only the products are timed: the rest
of a decode step (norms, RoPE, attention, sampling) comes on top. Weights are random; each
shape is timed over enough distinct copies to stream from memory, not from cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    # d_model, d_ff, n_heads * head_dim, n_kv_heads * head_dim, layers, vocab
    "smollm2": (576, 1536, 576, 192, 30, 49152),
    "qwen2-0.5b": (896, 4864, 896, 128, 24, 151936),
}


def _time(fn, copies: int) -> float:
    """Milliseconds per product: the fastest of several sweeps over `copies` weights."""
    fn(0)
    sweeps = []
    for _ in range(7):
        t0 = time.perf_counter()
        for i in range(copies):
            fn(i)
        sweeps.append((time.perf_counter() - t0) / copies * 1000)
    return min(sweeps)


def _formats(n: int, k: int, copies: int) -> dict[str, float]:
    from backends.base import dense_linear
    from backends.bnb import Int4Backend, Int8Backend
    from backends.weight_only import Q4Backend, Q8Backend

    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(n, k, generator=gen) * 0.02 for _ in range(copies)]
    x32 = torch.randn(1, k, generator=gen)
    x16 = x32.bfloat16()
    out = {}
    layers = [dense_linear(w, None) for w in dense]
    out["fp32"] = _time(lambda i: layers[i](x32), copies)
    bf = [w.bfloat16() for w in dense]
    out["bf16"] = _time(lambda i: F.linear(x16, bf[i]), copies)
    # bitsandbytes layers exactly as vlm's int8 / int4 backends build them from fp32 weights
    name = "decoder.layers.0.mlp.up_proj"  # a layer both quantize by default
    int8 = [Int8Backend(device="cpu").make_linear(name, w, None) for w in dense]
    out["bnb int8"] = _time(lambda i: int8[i](x32), copies)
    nf4 = [Int4Backend(device="cpu").make_linear(name, w, None) for w in dense]
    out["bnb nf4"] = _time(lambda i: nf4[i](x32), copies)
    for label, backend in (("q8", Q8Backend()), ("q4 g32", Q4Backend(group=32)), ("q4 g64", Q4Backend(group=64))):
        layers = [backend.make_linear(name, w, None) for w in dense]
        out[label] = _time(lambda i: layers[i](x32), copies)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    args = parser.parse_args()
    d, ff, q, kv, n_layers, vocab = MODELS[args.model]
    # per layer: q|k|v, o, gate|up, down
    shapes = {(q + 2 * kv, d): 1, (d, q): 1, (2 * ff, d): 1, (d, ff): 1}
    totals: dict[str, float] = {}
    for (n, k), count in shapes.items():
        copies = max(2, int(48e6 // (n * k * 4)))  # ~48 MB of fp32 per shape: out of cache
        for fmt, ms in _formats(n, k, copies).items():
            totals[fmt] = totals.get(fmt, 0.0) + ms * count * n_layers
        print(f"  {n}x{k} done", file=sys.stderr)
    head = _formats(vocab, d, 2)  # the head with `-b q8:lm_head` / `-b q4:lm_head`
    print(f"{args.model}: {n_layers} layers, d_model {d}, d_ff {ff}; batch-1 products per decode step, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"{'format':12} {'layers ms':>10} {'+ head ms':>10} {'bound tok/s':>12}   (head in the same format)")
    for fmt, ms in totals.items():
        step = ms + head[fmt]
        print(f"{fmt:12} {ms:10.2f} {head[fmt]:10.2f} {1000 / step:12.1f}")
    print(f"\nlm_head kept in fp32, as vlm's int8/int4/q8/q4 backends do by default: {head['fp32']:.2f} ms")


if __name__ == "__main__":
    main()
