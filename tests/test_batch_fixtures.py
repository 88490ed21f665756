"""The collection `vlm batch`'s tests run on (no tests here; tests/test_batch*.py use it):
200 rows, 195 good generated pictures and 5 bad ones, and the reference for each row,
what a single-image run of the bundled demo model gives for it alone.

    cut.png      truncated: its header is fine, it fails when decoded
    notes.png    text, not an image
    empty.png    zero bytes
    bomb.png     a PNG header claiming 100000x100000 pixels (Pillow's decompression-bomb limit)
    gone.png     listed in the manifest, not on disk
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

from vlmcli.errors import ImageError
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

PROMPT = "Describe this image."  # vlm describe's default, and the demo model's
GOOD = 195
BAD = ("cut.png", "notes.png", "empty.png", "bomb.png", "gone.png")
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 160, 30), (230, 200, 20), (140, 40, 170), (240, 130, 20)]


def make_collection(folder: Path) -> tuple[Path, list[str]]:
    """Images in `folder`/images and a text manifest listing all 200 (absolute paths, the bad
    ones spread through the list); returns (manifest, the listed paths in order)."""
    images = folder / "images"
    images.mkdir()
    rng = random.Random(16)
    paths = []
    for i in range(GOOD):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        x, y, size = rng.randint(2, 30), rng.randint(2, 30), rng.randint(14, 32)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x, y, x + size, y + size), fill=rng.choice(COLOURS))
        path = images / f"img{i:03d}.png"
        img.save(path)
        paths.append(str(path))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "PNG")
    (images / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (images / "notes.png").write_text("not a picture\n")
    (images / "empty.png").write_bytes(b"")
    (images / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    for n, name in enumerate(BAD):  # at rows 20, 60, 100, 140, 180
        paths.insert(20 + 40 * n, str(images / name))
    manifest = folder / "manifest.txt"
    manifest.write_text("# the collection\n" + "\n".join(paths) + "\n")
    return manifest, paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: Pillow refuses it on opening, before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def reference(demo: Pipeline, path: str) -> dict:
    """What a single-image run gives for `path`: the answer's text and tokens, or the error
    and its type (as `vlm describe IMAGE --json`)."""
    try:
        answer = demo.describe([path], PROMPT, SamplingOptions())
    except ImageError as e:
        return {"error": str(e), "error_type": e.kind}
    return {"text": answer.text, "tokens": answer.tokens, "finish_reason": answer.finish_reason}


def comparable(record: dict) -> dict:
    """An output row's fields that a single-image run also gives."""
    keys = ("error", "error_type") if record.get("error") is not None else ("text", "tokens", "finish_reason")
    return {k: record[k] for k in keys}


def without_timings(record: dict) -> dict:
    """A row as it must be on every run (timings are the only field that varies)."""
    return {k: v for k, v in record.items() if k != "timings"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
