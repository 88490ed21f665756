"""The bundled demo model (`-m demo`): small, loadable by us and by transformers, and accurate.

The accuracy tests run the real inference path (`Pipeline.load("demo", backend)`, greedy)
on a fixed held-out set from training/eval_demo.py: scenes drawn from a seed that training
never uses, at resolutions 50-1000 px, half of them JPEG-compressed. How the model was
made and measured: training/train_demo.py, training/eval_demo.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from training import eval_demo, shapes
from training.make_examples import EXAMPLES
from vlmcli.checkpoint import demo_path
from vlmcli.generate import SamplingOptions
from vlmcli.pipeline import Pipeline

DEMO = demo_path()
N_HELD_OUT = 90  # 30 scenes each of one, two and three shapes

# Per backend: (least caption "pairs named" score, least QA accuracy). The QA floor is the
# accuracy measured on 600 held-out scenes with the fp32 CPU backend, minus a margin for
# this smaller set. Quantized backends add their own row (and own margins) here when they
# exist; a backend that cannot run on this machine is skipped.
# Least accepted scores on the fixed held-out set, per backend, set a little under what the
# shipped weights measured (python -m training.eval_demo -n 100 -b BACKEND): fp32 pairs
# 0.96, QA colour 0.75, count 0.96, all 0.83; int8 pairs 0.96, nf4 0.95 (QA all 0.83 both).
# Captions carry the target (>= 0.95 in fp32, within 3 points quantized); QA is
# weaker (colour and "is there" questions), which the note on the issue says.
THRESHOLDS = {
    "cpu": {"pairs": 0.95, "colour": 0.70, "count": 0.90, "all": 0.75},
    "int8": {"pairs": 0.92, "colour": 0.65, "count": 0.85, "all": 0.70},
    "int4": {"pairs": 0.92, "colour": 0.65, "count": 0.85, "all": 0.70},
}

GREEDY = SamplingOptions(max_new_tokens=32, temperature=0.0)


def test_files_are_complete_and_small():
    names = {p.name for p in DEMO.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert required in names
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < 10 * 1024 * 1024, f"demo model is {total / 2**20:.1f} MiB"
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"


def test_caption_metric():
    scene = shapes.Scene(
        (shapes.Shape("triangle", "red", 0.3, 0.3, 0.2), shapes.Shape("circle", "orange", 0.7, 0.7, 0.2)),
        background=(0, 0, 90),
    )
    assert shapes.caption(scene) == "an orange circle and a red triangle"
    assert eval_demo.pairs_score(scene, shapes.caption(scene)) == 1.0
    assert eval_demo.pairs_score(scene, "a red triangle") == 0.5
    assert eval_demo.pairs_score(scene, "two red triangles") == 0.5
    assert eval_demo.pairs_score(scene, "a red triangle and a red triangle") == 0.0  # repeated
    assert eval_demo.pairs_score(scene, "an orange circle, a red triangle and a blue square") == 0.0  # extra
    assert eval_demo.pairs_score(scene, "nothing") == 0.0


def test_special_tokens():
    pipe = _pipeline("cpu")
    tok = pipe.tokenizer
    for name in ("<s>", "</s>", "<unk>", "<pad>", "<image>"):
        assert tok.token_to_id(name) is not None
    assert tok.token_to_id("<image>") == pipe.config.image_token_id
    assert pipe.tokens_per_image == 64


_PIPELINES: dict[str, Pipeline] = {}
_REPORTS: dict[str, eval_demo.Report] = {}


def _pipeline(backend: str) -> Pipeline:
    if backend not in _PIPELINES:
        _PIPELINES[backend] = Pipeline.load("demo", backend, download_progress=False)
    return _PIPELINES[backend]


def _report(backend: str) -> eval_demo.Report:
    if backend not in _REPORTS:
        try:
            pipe = _pipeline(backend)
        except Exception as e:  # e.g. a GPU backend on a machine without one
            pytest.skip(f"backend {backend} unavailable: {e}")
        _REPORTS[backend] = eval_demo.evaluate(pipeline=pipe, n=N_HELD_OUT)
    return _REPORTS[backend]


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(THRESHOLDS))
def test_caption_accuracy_on_held_out_scenes(backend):
    report = _report(backend)
    assert report.pairs >= THRESHOLDS[backend]["pairs"], (report.as_dict(), report.failures[:5])


@pytest.mark.parametrize("backend", sorted(THRESHOLDS))
def test_question_answering_on_held_out_scenes(backend):
    report = _report(backend)
    least = THRESHOLDS[backend]
    assert report.qa_accuracy("colour") >= least["colour"], report.as_dict()
    assert report.qa_accuracy("count") >= least["count"], report.as_dict()
    assert report.qa_accuracy() >= least["all"], report.as_dict()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_described_exactly(name):
    scene, _ = EXAMPLES[name]
    path = DEMO.parents[1] / "examples" / name
    answer = _pipeline("cpu").describe([path], "Describe this image.", GREEDY)
    assert answer.text == shapes.caption(scene)
    assert answer.finish_reason == "stop"


def test_cli_describe_demo(capsys):
    from vlmcli.cli import main

    path = DEMO.parents[1] / "examples" / "two_shapes.png"
    assert main(["describe", str(path), "-m", "demo", "--json", "-q"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["text"] == shapes.caption(EXAMPLES["two_shapes.png"][0])
    assert record["image_tokens"] == 64


def test_transformers_gives_the_same_greedy_tokens():
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    model = transformers.LlavaForConditionalGeneration.from_pretrained(DEMO, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(DEMO)
    pipe = _pipeline("cpu")
    items = eval_demo.held_out_set(6, seed=eval_demo.EVAL_SEED + 1)
    cases = [(DEMO.parents[1] / "examples" / name, "Describe this image.") for name in sorted(EXAMPLES)]
    import io
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for i, item in enumerate(items):
            path = Path(d) / f"{i}.{item.fmt}"
            path.write_bytes(item.image)
            question = item.questions[i % len(item.questions)].question
            cases.append((path, "Describe this image." if i % 2 else question))
        for path, prompt in cases:
            ours = pipe.describe([path], prompt, GREEDY)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            image = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
            inputs = processor(images=image, text=text, return_tensors="pt")
            assert inputs["input_ids"].shape[1] == ours.prompt_tokens
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
            theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
            if theirs and theirs[-1] == processor.tokenizer.eos_token_id:
                theirs = theirs[:-1]  # we report the stop token as finish_reason, not a token
            assert ours.tokens == theirs, (path.name, prompt)
