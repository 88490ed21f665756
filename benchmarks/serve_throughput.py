"""Aggregate decode throughput of `vlm serve` with 1, 2, 4 and 8 concurrent streams.

    python benchmarks/serve_throughput.py [--model smollm2|demo|PATH] [--backend cpu]
                                          [--streams 1,2,4,8] [--tokens N] [--rounds R] [--json]

A real `vlm serve` process on 127.0.0.1 (batches of up to 8) and the official `openai`
client: for each stream count N, N clients at once each send R requests one after the other
(greedy, `max_tokens` N tokens, a different prompt and image per client), and the aggregate
rate is the completion tokens of all of them over the wall time from the first request sent
to the last answer received (prefills included: a prefill pauses the batch). Before that,
every client's prompt runs alone once; each batched answer must be the same text as its solo
run (the script says so per stream count, and exits 1 if one differs).

--model smollm2 (default) is the SmolLM2-135M-Instruct LLaVA fixture (real decoder weights,
tests/checkpoints.py; built and cached on first use).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGES = ["shapes.png", "two_shapes.png", "one_shape.png"]
PROMPTS = [
    "Describe the image in detail.",
    "Write a short story about this picture.",
    "What could this image be used for? Explain at length.",
    "List everything you can see, with colours.",
    "Write a poem inspired by this image.",
    "Explain this picture to a child.",
    "What is unusual about this image? Give reasons.",
    "Describe the shapes and their positions.",
]


def resolve_model(name: str) -> str:
    if name == "smollm2":
        from tests.checkpoints import smollm2_llava_checkpoint

        return str(smollm2_llava_checkpoint())
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, backend: str, max_batch: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmcli", "serve", "-m", model, "-b", backend, "--port", str(port),
         "--max-batch", str(max_batch), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
        env={k: v for k, v in os.environ.items() if k != "VLM_API_KEY"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vlm serve exited with {proc.returncode}: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"vlm serve did not start: {log_path.read_text()}")


def _messages(i: int) -> list[dict]:
    data = base64.b64encode((ROOT / "examples" / IMAGES[i % len(IMAGES)]).read_bytes()).decode()
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
    ]}]


def ask(client, i: int, tokens: int) -> tuple[str, int]:
    r = client.chat.completions.create(model=client.served_model, messages=_messages(i), temperature=0, max_tokens=tokens)
    return r.choices[0].message.content, r.usage.completion_tokens


def run_streams(client, n: int, rounds: int, tokens: int) -> dict:
    start = threading.Barrier(n)

    def stream(i: int) -> list[tuple[str, int]]:
        start.wait()
        return [ask(client, i, tokens) for _ in range(rounds)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(stream, range(n)))
    wall = time.perf_counter() - t0
    completion = sum(t for per in answers for _, t in per)
    return {"streams": n, "wall_s": wall, "completion_tokens": completion, "tok_s": completion / wall, "answers": answers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(s) for s in args.streams.split(",")]

    import openai

    from vlmcli.bench import machine_info

    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(model, args.backend, max(counts), Path(tmp) / "serve.log")
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=600, max_retries=0)
            client.served_model = client.models.list().data[0].id
            ask(client, 0, 4)  # warm-up: first-call costs are not throughput
            solo = [ask(client, i, args.tokens)[0] for i in range(max(counts))]
            rows = []
            for n in counts:
                row = run_streams(client, n, args.rounds, args.tokens)
                row["same_as_solo"] = all(text == solo[i] for i, per in enumerate(row.pop("answers")) for text, _ in per)
                rows.append(row)
        finally:
            proc.terminate()
            proc.wait(30)

    one = next((r["tok_s"] for r in rows if r["streams"] == 1), None)
    for r in rows:
        r["vs_one"] = r["tok_s"] / one if one else None
    report = {"machine": machine_info(), "model": args.model, "backend": args.backend, "tokens": args.tokens,
              "rounds": args.rounds, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        print(f"{m['cpu']}, {m['logical_cores']} logical cores; model {args.model}, -b {args.backend}, "
              f"{args.tokens} tokens x {args.rounds} requests per stream")
        print(f"{'streams':>7} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x one':>6}  same as solo")
        for r in rows:
            vs = f"{r['vs_one']:.2f}" if r["vs_one"] else "-"
            print(f"{r['streams']:>7} {r['completion_tokens']:>7} {r['wall_s']:>7.1f} {r['tok_s']:>7.1f} {vs:>6}  {r['same_as_solo']}")
    return 0 if all(r["same_as_solo"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
