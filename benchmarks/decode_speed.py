"""Side by side: vlm against transformers' `generate` on the same checkpoint, image and prompt.

    python benchmarks/decode_speed.py [--model smollm2|default-size|PATH] [--backend cpu]...
                                      [--tokens N] [--repeat R] [--json]

--model: `smollm2` (default) is the engine issue's fixture, SmolLM2-135M-Instruct's real
weights as the decoder of a LLaVA with a tiny CLIP; `default-size` is a random LLaVA the
size of the CLI's default model (SigLIP-so400m-384 + Qwen2-0.5B, 729 image tokens; see
tests/family_checkpoints.py). Both are built and cached on first use.
--backend: what vlm runs with (repeat it to run several side by side, e.g.
`--backend cpu --backend q8 --backend q4`), and what transformers is compared against:
    cpu, cpu-bf16   transformers in fp32 (the issue's baseline for bf16 too); for cpu-bf16
                    vlm fp32 runs as well, to count how many greedy tokens bf16 keeps
    q8, q4 (:opts)  transformers in fp32; vlm's weight-only CPU backends quantize while
                    loading (backends/weight_only.py); vlm fp32 runs as well when not asked,
                    to count how many greedy tokens each keeps
    int8, int4      the checkpoint converted once by `vlm convert` (int8 / nf4), which both
                    load: transformers reads its quantization_config, bitsandbytes' kernels
                    run in both
Each run is its own subprocess (so peak RSS is its own, and nothing is warm from the other);
the implementations alternate R times and the medians are reported. Each process does one
warm-up generation first. Reported: time to first token (from the image file to the first
new token), decode tokens/s (after the first token), peak RSS, and whether the greedy tokens
are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Describe the image in detail."


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_vlm(model: str, image: str, tokens: int, backend: str) -> dict:
    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline

    pipe = Pipeline.load(model, backend)
    pipe.describe([image], PROMPT, SamplingOptions(max_new_tokens=2, temperature=0))  # warm-up
    t0 = time.perf_counter()
    answer = pipe.describe([image], PROMPT, SamplingOptions(max_new_tokens=tokens, temperature=0))
    return {
        "impl": f"vlm {backend}",
        "ttft_ms": (answer.timings.first_token_at - t0) * 1000,
        "decode_tok_s": answer.timings.decode_tokens_per_s,
        "tokens": answer.tokens,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_transformers(model: str, image: str, tokens: int, backend: str) -> dict:
    import torch
    import transformers
    from PIL import Image

    from vlmcli.sequence import user_message

    ref = transformers.LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(model)
    owner = processor if processor.chat_template else processor.tokenizer
    text = owner.apply_chat_template([user_message(PROMPT, 1)], add_generation_prompt=True, tokenize=False)
    eos = ref.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])

    class Clock(transformers.generation.streamers.BaseStreamer):
        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def once(n):
        clock = Clock()
        t0 = time.perf_counter()
        inputs = processor(text=text, images=[Image.open(image).convert("RGB")], return_tensors="pt")
        with torch.inference_mode():
            out = ref.generate(**inputs, max_new_tokens=n, do_sample=False, streamer=clock)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        if stop & set(new):  # cut at the stop token, which vlm does not return
            new = new[: min(new.index(s) for s in stop & set(new))]
        return t0, clock.stamps, new

    once(2)  # warm-up
    t0, stamps, ids = once(tokens)
    # stamps[0] is the prompt, stamps[1] the first new token
    n_decode = len(stamps) - 2
    return {
        "impl": "transformers" + (" + bitsandbytes" if backend.startswith("int") else " fp32"),
        "ttft_ms": (stamps[1] - t0) * 1000,
        "decode_tok_s": n_decode / (stamps[-1] - stamps[1]) if n_decode > 0 else 0.0,
        "tokens": ids,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_llama_cpp(model: str, image: str, tokens: int, backend: str) -> dict:
    """llama.cpp (llama-cpp-python) on the GGUF file the SmolLM2 fixture's decoder comes from
    (SmolLM2-135M-Instruct, Q4_1), with the same threads: the same weights and prompt text,
    no image (its decoder speed is what is compared; TTFT is not comparable)."""
    import llama_cpp

    from tests.checkpoints import smollm2_gguf_path
    from vlmcli.cli.common import set_threads

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=1024, n_threads=set_threads(), verbose=False)
    messages = [{"role": "user", "content": PROMPT}]

    def once(n):
        stamps, ids = [], []
        t0 = time.perf_counter()
        for chunk in llm.create_chat_completion(messages, max_tokens=n, temperature=0.0, top_k=1, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        return t0, stamps

    once(2)  # warm-up
    t0, stamps = once(tokens)
    n_decode = len(stamps) - 1
    return {
        "impl": "llama.cpp Q4_1 (text only)",
        "ttft_ms": (stamps[0] - t0) * 1000,
        "decode_tok_s": n_decode / (stamps[-1] - stamps[0]) if n_decode > 0 else 0.0,
        "tokens": [],
        "peak_rss_mb": _peak_rss_mb(),
    }


def resolve_model(name: str | None, backend: str) -> str:
    """The checkpoint both sides load: a named fixture (built once), converted for int8/int4."""
    from tests.checkpoints import _default_cache_root, smollm2_llava_checkpoint
    from tests.family_checkpoints import default_size_checkpoint

    if name in (None, "smollm2"):
        path = smollm2_llava_checkpoint()
    elif name == "default-size":
        path = default_size_checkpoint()
    else:
        path = Path(name)
    if not backend.startswith("int"):
        return str(path)
    from vlmcli.convert import ConvertOptions, convert

    fmt = "int8" if backend.startswith("int8") else "nf4"
    out = _default_cache_root() / f"{path.name}-{fmt}"
    if not (out / "config.json").is_file():
        convert(str(path), out, ConvertOptions(to=fmt), download_progress=False)
    return str(out)


def _child(which: str, model: str, image: str, tokens: int, backend: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model", model, "--image", image,
           "--tokens", str(tokens), "--backend", backend]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        sys.exit(f"{which} ({backend}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    row = dict(runs[0])
    for key in ("ttft_ms", "decode_tok_s", "peak_rss_mb"):
        row[key] = statistics.median(r[key] for r in runs)
        row[key + "_all"] = [round(r[key], 2) for r in runs]
    return row


def agreement(a: list[int], b: list[int]) -> dict:
    """How far two greedy continuations agree: the common prefix, and positions equal."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    n = max(len(a), len(b))
    return {"common_prefix": prefix, "positions_equal": sum(x == y for x, y in zip(a, b)), "of": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--image")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--backend", action="append", help="repeatable; default cpu")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--vs-llama-cpp", action="store_true",
                        help="also llama.cpp on the SmolLM2 GGUF (llama-cpp-python; --model smollm2 only)")
    parser.add_argument("--child", choices=["vlm", "transformers", "llama.cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        fn = {"vlm": run_vlm, "transformers": run_transformers, "llama.cpp": run_llama_cpp}[args.child]
        print(json.dumps(fn(args.model, args.image, args.tokens, args.backend[0])))
        return

    from tests.checkpoints import write_test_image

    specs = args.backend or ["cpu"]
    if len(specs) > 1 and any(b.startswith("int") for b in specs):
        parser.error("int8 / int4 run on a converted checkpoint: give them alone")
    model = resolve_model(args.model, specs[0])
    image = args.image or str(write_test_image(Path("/tmp/vlm-bench.png"), size=(640, 480), seed=7))
    plan = [("transformers", specs[0])] + [("vlm", b) for b in specs]
    if any(b == "cpu-bf16" or b.startswith(("q8", "q4")) for b in specs) and "cpu" not in specs:
        plan.append(("vlm", "cpu"))  # the fp32 tokens the others are compared with
    if args.vs_llama_cpp:
        plan.append(("llama.cpp", "Q4_1"))
    runs: dict[tuple[str, str], list[dict]] = {p: [] for p in plan}
    for _ in range(args.repeat):
        for which, backend in plan:
            runs[(which, backend)].append(_child(which, model, image, args.tokens, backend))
    rows = [_median(runs[p]) for p in plan]
    ref, ours = rows[0], rows[1]
    fp32 = next((r for r in rows if r["impl"] == "vlm cpu"), None)
    result = {
        "model": model,
        "backend": specs[0] if len(specs) == 1 else specs,
        "tokens": args.tokens,
        "repeat": args.repeat,
        "rows": rows,
        "decode_ratio": ours["decode_tok_s"] / ref["decode_tok_s"],
        "ttft_ratio": ours["ttft_ms"] / ref["ttft_ms"],
        "rss_ratio": ours["peak_rss_mb"] / ref["peak_rss_mb"],
        "same_tokens_as_transformers": ref["tokens"] == ours["tokens"],
    }
    result["vs_transformers"] = {
        r["impl"]: {"decode_ratio": r["decode_tok_s"] / ref["decode_tok_s"], "ttft_ratio": r["ttft_ms"] / ref["ttft_ms"],
                    "same_tokens": r["tokens"] == ref["tokens"],
                    **({"vs_vlm_fp32": agreement(fp32["tokens"], r["tokens"])} if fp32 and r is not fp32 and r["tokens"] else {})}
        for r in rows[1:]
    }
    if specs == ["cpu-bf16"]:
        result["bf16_vs_fp32"] = agreement(rows[2]["tokens"], ours["tokens"])
    if args.json:
        print(json.dumps(result))
        return
    print(f"model: {model}\nimage: {image}, {args.tokens} new tokens, greedy, median of {args.repeat}\n")
    print(f"{'':28} {'TTFT ms':>9} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['impl']:28} {r['ttft_ms']:9.1f} {r['decode_tok_s']:13.2f} {r['peak_rss_mb']:12.0f}")
    print(f"\nvlm / transformers: decode {result['decode_ratio']:.2f}x, TTFT {result['ttft_ratio']:.2f}, "
          f"peak RSS {result['rss_ratio']:.2f}; same tokens: {result['same_tokens_as_transformers']}")
    for impl, v in list(result["vs_transformers"].items())[1:]:
        agree = v.get("vs_vlm_fp32")
        kept = f"; greedy tokens vs vlm fp32: first {agree['common_prefix']} of {agree['of']} identical" if agree else ""
        print(f"{impl} / transformers: decode {v['decode_ratio']:.2f}x, TTFT {v['ttft_ratio']:.2f}{kept}")
    if "bf16_vs_fp32" in result:
        a = result["bf16_vs_fp32"]
        print(f"bf16 vs fp32 greedy tokens: first {a['common_prefix']} identical, "
              f"{a['positions_equal']} of {a['of']} positions equal")


if __name__ == "__main__":
    main()
