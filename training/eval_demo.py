"""Measure the demo model on held-out scenes, through the real inference path.

    python -m training.eval_demo                 # the bundled demo, 300 scenes
    python -m training.eval_demo -m PATH -n 100 -b cpu

Held-out scenes are drawn from their own seed (never used in training), with shapes of
sizes 0.18-0.45 of the side, rendered at resolutions the training renderer never used as
such a set (see EVAL_RESOLUTIONS), without colour jitter, and every other image saved as
JPEG (quality 60-90); the files' bytes go through `Pipeline` exactly as `vlm describe`
sends a file: decode, preprocess, vision, projector, prompt, greedy decoding.

Metrics (each a mean over scenes, in [0, 1]):

* pairs named ("colour-shape pairs named"): for a scene with the set P of (colour, shape)
  pairs, let M be the list of "<colour> <shape>" mentions in the generated caption (the
  answer to "Describe this image."; plurals count, order does not). The scene scores
  |P ∩ set(M)| / |P| if every mention is in P and none is repeated, else 0: a caption
  that names one shape that is not there, or names a shape twice, scores 0.
* caption exact: the caption is exactly `training.shapes.caption(scene)`.
* QA accuracy per question kind (`colour`: "what colour is the <shape>?" for a shape kind
  that occurs once; `count`: "how many shapes are there?"; `count_kind`: "how many
  <shape>s are there?"; `exists`: "is there a <colour> <shape>?"; `shape`: "what shape is
  <colour>?"): the answer, stripped and lower-cased, without a final full stop, equals the
  expected word exactly.

`evaluate` returns the numbers; `backend` selects the backend (a hook for the quantized
backends: the same held-out set, another `-b`).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import shapes  # noqa: E402

EVAL_SEED = 777_000
EVAL_RESOLUTIONS = (50, 75, 100, 150, 231, 333, 512, 1000)
EVAL_SIZES = (0.18, 0.45)
CAPTION_PROMPT = "Describe this image."


@dataclass(frozen=True)
class EvalItem:
    scene: shapes.Scene
    image: bytes  # an encoded PNG or JPEG file
    resolution: int
    fmt: str
    questions: tuple[shapes.QA, ...]


def held_out_set(n: int, seed: int = EVAL_SEED) -> list[EvalItem]:
    """n scenes (n/3 each of one, two, three shapes), images encoded as files, and for each
    scene a colour question (when a shape kind occurs once), a count question, a per-kind
    count question and a yes/no question."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        scene = shapes.sample_scene(rng, n_shapes=1 + i % 3, size_range=EVAL_SIZES)
        resolution = EVAL_RESOLUTIONS[i % len(EVAL_RESOLUTIONS)]
        img = shapes.render(scene, resolution)
        buf = io.BytesIO()
        if i % 2:
            fmt = "jpeg"
            img.save(buf, format="JPEG", quality=rng.randint(60, 90))
        else:
            fmt = "png"
            img.save(buf, format="PNG")
        qs = shapes.questions(scene, rng)
        by_kind: dict[str, list[shapes.QA]] = {}
        for qa in qs:
            by_kind.setdefault(qa.category, []).append(qa)
        chosen = [rng.choice(v) for k, v in sorted(by_kind.items())]
        items.append(EvalItem(scene, buf.getvalue(), resolution, fmt, tuple(chosen)))
    return items


def pairs_score(scene: shapes.Scene, text: str) -> float:
    mentions = shapes.pairs_in_text(text)
    truth = scene.pairs
    if any(m not in truth for m in mentions) or len(set(mentions)) != len(mentions):
        return 0.0
    return len(set(mentions) & truth) / len(truth)


def normalize_answer(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


@dataclass
class Report:
    n: int = 0
    pairs: float = 0.0
    caption_exact: float = 0.0
    qa: dict[str, list[int]] = field(default_factory=dict)  # category -> [right, asked]
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def qa_accuracy(self, category: str | None = None) -> float:
        cats = [category] if category else list(self.qa)
        right = sum(self.qa[c][0] for c in cats if c in self.qa)
        asked = sum(self.qa[c][1] for c in cats if c in self.qa)
        return right / asked if asked else float("nan")

    def as_dict(self) -> dict:
        return {
            "scenes": self.n,
            "pairs_named": round(self.pairs, 4),
            "caption_exact": round(self.caption_exact, 4),
            "qa": {c: round(r / a, 4) for c, (r, a) in sorted(self.qa.items())},
            "qa_all": round(self.qa_accuracy(), 4),
            "seconds": round(self.seconds, 1),
        }


def evaluate(model: str = "demo", n: int = 300, backend: str = "cpu", seed: int = EVAL_SEED,
             pipeline=None, items: list[EvalItem] | None = None) -> Report:
    """Caption and QA accuracy of `model` on `n` held-out scenes (greedy decoding)."""
    import torch

    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = pipeline or Pipeline.load(model, backend, download_progress=False)
    opts = SamplingOptions(max_new_tokens=32, temperature=0.0)
    items = items if items is not None else held_out_set(n, seed)
    report = Report(n=len(items))
    pairs_total = exact_total = 0.0
    with torch.inference_mode():
        for item in items:
            text = pipe.describe([item.image], CAPTION_PROMPT, opts).text
            score = pairs_score(item.scene, text)
            pairs_total += score
            exact = text.strip() == shapes.caption(item.scene)
            exact_total += exact
            if score < 1:
                report.failures.append({"caption": text, "expected": shapes.caption(item.scene),
                                        "resolution": item.resolution, "format": item.fmt,
                                        "background": item.scene.background})
            for qa in item.questions:
                answer = normalize_answer(pipe.describe([item.image], qa.question, opts).text)
                right, asked = report.qa.setdefault(qa.category, [0, 0])
                report.qa[qa.category] = [right + (answer == qa.answer), asked + 1]
                if answer != qa.answer:
                    report.failures.append({"question": qa.question, "answer": answer, "expected": qa.answer,
                                            "caption": shapes.caption(item.scene)})
    report.pairs = pairs_total / len(items)
    report.caption_exact = exact_total / len(items)
    report.seconds = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Accuracy of the demo model on held-out scenes")
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("-n", type=int, default=300, help="number of held-out scenes")
    ap.add_argument("-b", "--backend", default="cpu")
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--failures", type=int, default=10, help="print this many failures")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    report = evaluate(args.model, args.n, args.backend, args.seed)
    for f in report.failures[: args.failures]:
        print("FAIL", json.dumps(f), file=sys.stderr)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
