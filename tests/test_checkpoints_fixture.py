"""Sanity checks of the checkpoint builders themselves (tests/checkpoints.py).

If these fail, every reference-comparison test is comparing against a broken fixture.
transformers is the judge here: it must load what we write and behave sensibly.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoints import LLAVA_TEMPLATE, train_tokenizer, write_test_image

transformers = pytest.importorskip("transformers")

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]


def _load(path):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(path)


def _image_inputs(processor, image_path):
    from PIL import Image

    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    with Image.open(image_path) as image:
        return processor(text=text, images=image, return_tensors="pt")


def test_tokenizer_special_ids_and_determinism():
    tok = train_tokenizer()
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<0x00>")] == [0, 1, 2, 3]
    assert tok.token_to_id("<image>") == tok.get_vocab_size() - 1 == 511
    assert tok.encode("hello").ids[0] == 1  # BOS prepended by the post-processor
    assert tok.to_str() == train_tokenizer().to_str()


def test_tiny_checkpoint_files(llava_ckpt):
    names = {p.name for p in llava_ckpt.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
    } <= names
    config = json.loads((llava_ckpt / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_token_index"] == 511
    assert "chat_template" not in json.loads((llava_ckpt / "tokenizer_config.json").read_text())
    assert json.loads((llava_ckpt / "chat_template.json").read_text()) == {"chat_template": LLAVA_TEMPLATE}


def test_transformers_tokenizer_agrees_with_tokenizers(tokenizer_dir):
    # Our runtime uses `tokenizers` directly; the reference goes through AutoTokenizer.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in ["USER: <image>\nWhat is this? ASSISTANT:", "A café naïve 日本 ok", "  two  spaces", "</s>x"]:
        ids = raw.encode(text).ids
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == raw.decode(ids)


def test_processor_renders_template_and_expands_image(llava_ckpt, test_image):
    processor = transformers.AutoProcessor.from_pretrained(llava_ckpt)
    assert processor.apply_chat_template(PROMPT, add_generation_prompt=True) == (
        "USER: <image>\nWhat is in this picture? ASSISTANT:"
    )
    inputs = _image_inputs(processor, test_image)
    assert inputs["pixel_values"].shape == (1, 3, 30, 30)
    assert int((inputs["input_ids"] == 511).sum()) == 25  # (30 / 6)^2 patches, class token dropped


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hub_layout": True},
        {"key_layout": "module"},
        {"hub_layout": True, "legacy_config": True},
        {"hub_layout": True, "shards": 3},
    ],
    ids=["hub", "module", "legacy-config", "sharded"],
)
def test_layouts_load_to_identical_logits(make_llava, llava_ckpt, test_image, kwargs):
    variant = make_llava(**kwargs)
    if kwargs.get("shards", 1) > 1:
        index = json.loads((variant / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    if kwargs.get("hub_layout"):
        index_or_file = variant / "model.safetensors.index.json"
        keys = (
            json.loads(index_or_file.read_text())["weight_map"]
            if index_or_file.exists()
            else _safetensors_keys(variant / "model.safetensors")
        )
        assert "vision_tower.vision_model.embeddings.class_embedding" in keys
        assert "language_model.lm_head.weight" in keys
    base_model, processor = _load(llava_ckpt)
    model, _ = _load(variant)
    inputs = _image_inputs(processor, test_image)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base_model(**inputs).logits, rtol=0, atol=0)


def _safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"seed": 1, "tie_word_embeddings": True, "num_key_value_heads": 4},
        {"seed": 2, "vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full"},
    ],
    ids=["default", "tied-mha", "multilayer-full"],
)
def test_greedy_tokens_are_diverse(make_llava, test_image, kwargs):
    model, processor = _load(make_llava(**kwargs))
    inputs = _image_inputs(processor, test_image)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 32 and len(set(new)) >= 10, new


def test_write_test_image(tmp_path):
    from PIL import Image
    import numpy as np

    a = write_test_image(tmp_path / "a.png", size=(50, 31), seed=3)
    b = write_test_image(tmp_path / "b.png", size=(50, 31), seed=3)
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as img:
        assert img.size == (50, 31) and img.mode == "RGB"
        pixels = np.asarray(img)
    assert all(pixels[..., c].std() > 20 for c in range(3))


@pytest.mark.slow
def test_smollm2_fixture_answers_paris(smollm2_llava):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_llava)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(smollm2_llava, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    # the template lives in chat_template.json, which the processor (not the tokenizer) reads
    processor = transformers.AutoProcessor.from_pretrained(smollm2_llava)
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert new == [504, 3575, 282, 4649, 314, 7042, 30, 2]
    assert tokenizer.decode(new, skip_special_tokens=True) == "The capital of France is Paris."
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == 49152
