"""Images per second of describing a collection, end to end (start-up and model load
included, as a user waits for them):

    describe, a process per image   `for f in ...; do vlm describe $f; done` (on --loop-images of them)
    describe, one process           `vlm describe FOLDER --json`
    batch                           `vlm batch MANIFEST -o out.jsonl`
    batch --ray, N actors           `vlm batch --ray MANIFEST -o out.parquet --actors N` (a local Ray
                                    started and stopped by the command: its ~10-20 s are in the figure)

    python benchmarks/batch_throughput.py [--images 200] [--model demo] [--actors 1 2] [--json]

Each run is a fresh `vlm` process on generated 64x64 pictures (tests/test_batch_fixtures.py's
good ones). Other load on the machine slows every row alike; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

VLM = [sys.executable, "-m", "vlmcli"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 160, 30), (230, 200, 20), (140, 40, 170), (240, 130, 20)]


def make_images(folder: Path, n: int) -> list[Path]:
    rng = random.Random(16)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        x, y, size = rng.randint(2, 30), rng.randint(2, 30), rng.randint(14, 32)
        draw = ImageDraw.Draw(img)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x, y, x + size, y + size), fill=rng.choice(COLOURS))
        paths.append(folder / f"img{i:05d}.png")
        img.save(paths[-1])
    return paths


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([*VLM, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    return time.perf_counter() - t0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--loop-images", type=int, default=10, help="images for the process-per-image loop")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_images(folder, args.images)
        manifest = Path(tmp) / "manifest.txt"
        manifest.write_text("".join(f"{p}\n" for p in paths))
        model = ["-m", args.model, "-q"]

        def record(name: str, n: int, seconds: float, command: str) -> None:
            results.append({"run": name, "images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2), "command": command})
            print(f"{name}: {n / seconds:.2f} images/s ({n} in {seconds:.1f} s)", file=sys.stderr)

        loop = paths[: args.loop_images]
        record("describe, a process per image", len(loop), sum(timed(["describe", str(p), *model]) for p in loop),
               "for f in images/*; do vlm describe $f -m MODEL; done")
        record("describe, one process", len(paths), timed(["describe", str(folder), "--json", *model]),
               "vlm describe images/ --json -m MODEL")
        record("batch", len(paths), timed(["batch", str(manifest), "-o", f"{tmp}/out.jsonl", *model]),
               "vlm batch manifest.txt -o out.jsonl -m MODEL")
        for n in args.actors:
            out = f"{tmp}/out-{n}.parquet"
            record(f"batch --ray, {n} actor{'s' if n > 1 else ''}", len(paths),
                   timed(["batch", "--ray", str(manifest), "-o", out, "--actors", str(n), *model]),
                   f"vlm batch --ray manifest.txt -o out.parquet --actors {n} -m MODEL")

    load = os.getloadavg()
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": load, "model": args.model, "results": results}, indent=2))
        return
    print(f"{cpu_model()}, {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; model {args.model}\n")
    print("| run | images | seconds | images/s |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['images']} | {r['seconds']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()
