"""Side-by-side decode speed: vlm against transformers' generate on the same checkpoint and image.

    python benchmarks/decode_speed.py [--model PATH] [--tokens N] [--backend cpu] [--json]

Each implementation runs in its own subprocess (so peak RSS is its own), with the same
prompt, image and greedy decoding; the tokens are compared. Without --model it uses the
SmolLM2-135M LLaVA test fixture (built and cached by tests/checkpoints.py).
Reported: time to first token (image load to first token), decode tokens/s (after the
first token), peak RSS, and whether the token ids are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    opts = SamplingOptions(max_new_tokens=tokens, temperature=0)
    pipe.describe([image], PROMPT, SamplingOptions(max_new_tokens=2, temperature=0))  # warm-up
    stamps = []
    t0 = time.perf_counter()
    answer = pipe.describe([image], PROMPT, opts, on_text=lambda _: stamps.append(time.perf_counter()))
    t1 = time.perf_counter()
    first = answer.timings.preprocess_ms + answer.timings.vision_ms + answer.timings.prefill_ms
    return {
        "impl": f"vlm ({backend})",
        "ttft_ms": first,
        "decode_tok_s": answer.timings.decode_tokens_per_s,
        "total_s": t1 - t0,
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
    messages = [user_message(PROMPT, 1)]
    owner = processor if processor.chat_template else processor.tokenizer
    text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

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
        return t0, clock.stamps, out[0, inputs["input_ids"].shape[1] :].tolist()

    once(2)  # warm-up
    t0, stamps, ids = once(tokens)
    # stamps[0] is the prompt, stamps[1] the first new token
    ttft = (stamps[1] - t0) * 1000
    n_decode = len(stamps) - 2
    decode = n_decode / (stamps[-1] - stamps[1]) if n_decode > 0 else 0.0
    return {
        "impl": "transformers",
        "ttft_ms": ttft,
        "decode_tok_s": decode,
        "total_s": stamps[-1] - t0,
        "tokens": ids,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--image")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=["vlm", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        fn = run_vlm if args.child == "vlm" else run_transformers
        print(json.dumps(fn(args.model, args.image, args.tokens, args.backend)))
        return

    from tests.checkpoints import smollm2_llava_checkpoint, write_test_image

    model = args.model or str(smollm2_llava_checkpoint())
    image = args.image or str(write_test_image(Path("/tmp/vlm-bench.png"), size=(640, 480), seed=7))
    rows = []
    for child in ("transformers", "vlm"):
        cmd = [sys.executable, __file__, "--child", child, "--model", model, "--image", image,
               "--tokens", str(args.tokens), "--backend", args.backend]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            sys.exit(f"{child} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref, ours = rows
    same = [t for t in ref["tokens"] if t not in (0, 2)] == ours["tokens"][: len(ref["tokens"])]
    if args.json:
        print(json.dumps({"model": model, "rows": rows, "same_tokens": same}))
        return
    print(f"model: {model}\nimage: {image}, {args.tokens} new tokens, greedy\n")
    print(f"{'':22} {'TTFT ms':>9} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['impl']:22} {r['ttft_ms']:9.1f} {r['decode_tok_s']:13.2f} {r['peak_rss_mb']:12.0f}")
    print(f"\ndecode ratio vlm/transformers: {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x; "
          f"TTFT ratio: {ours['ttft_ms'] / ref['ttft_ms']:.2f}; same tokens: {same}")


if __name__ == "__main__":
    main()
