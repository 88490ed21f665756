"""Qwen2-VL against transformers on tiny random checkpoints (tests/qwen2_vl_checkpoints.py):
patches and grids of Qwen2VLImageProcessor bit for bit, the prompt's ids and its 3-D RoPE
positions equal to get_rope_index, the merged visual tokens and logits at every position
within a measured tolerance, greedy tokens identical (non-square images, two images of
different sizes in one prompt, a text-only chat turn after an image turn), the tensor-slot
step equal to the eager one, and the hub layout of Qwen/Qwen2-VL-2B-Instruct on meta."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.qwen2_vl_checkpoints import make_qwen2_vl_checkpoint, reference_processor  # noqa: E402
from vlmcli.chat import ChatSession  # noqa: E402
from vlmcli.errors import ContextLengthError, UsageError  # noqa: E402
from vlmcli.families import describe, family_for, parse_config  # noqa: E402
from vlmcli.generate import SamplingOptions, Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import assistant_message, user_message  # noqa: E402

# measured on these checkpoints in float32 on CPU (worst case over the cases): features
# 2.6e-7, logits 2.9e-6 of the largest reference value; 0.0 for a single small image
FEATURE_RTOL = 1e-5  # max |ours - ref| / max |ref|
LOGIT_RTOL = 1e-5
NEW_TOKENS = 24
PROMPTS = ("What is in the picture?", "Describe the colours and shapes you see.")
WIDE, TALL, SMALL, BIG = (90, 50), (44, 100), (30, 30), (160, 120)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = make_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2vl"))
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref, reference_processor(path), Pipeline.load(str(path), "cpu")


def _pil(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _reference(ref, processor, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=[_pil(p) for p in images] or None, return_tensors="pt")


@pytest.mark.parametrize("size", [WIDE, TALL, SMALL, BIG, (13, 700), (600, 410)])
def test_patches_are_qwen2vl_image_processors(qwen, make_test_image, size):
    path, _, processor, ours = qwen
    image = make_test_image(size=size, seed=3)
    prepared = ours.prepare_images([image], Timings())
    expected = processor.image_processor(images=[_pil(image)], return_tensors="pt")
    assert prepared.pixels.dtype == torch.float32
    assert torch.equal(prepared.pixels, expected["pixel_values"])
    assert [list(g) for g in prepared.grids] == expected["image_grid_thw"].tolist()
    t, h, w = prepared.grids[0]
    assert prepared.token_counts == [t * h * w // 4]


def test_pixel_budget_is_settable(qwen, make_test_image):
    _, _, processor, ours = qwen
    image = make_test_image(size=BIG, seed=3)
    before = (ours.processor.min_pixels, ours.processor.max_pixels)
    try:
        ours.set_pixels(max_pixels=28 * 28 * 8)
        prepared = ours.prepare_images([image], Timings())
        expected = processor.image_processor(
            images=[_pil(image)], size={"shortest_edge": before[0], "longest_edge": 28 * 28 * 8}, return_tensors="pt"
        )
        assert torch.equal(prepared.pixels, expected["pixel_values"])
        assert prepared.token_counts[0] <= 8
        with pytest.raises(UsageError):
            ours.processor.set_pixels(min_pixels=10**6, max_pixels=1000)
        with pytest.raises(UsageError):
            ours.processor.set_pixels(max_pixels=0)
    finally:
        ours.processor.min_pixels, ours.processor.max_pixels = before


def check_parity(qwen, images, prompt):
    _, ref, processor, ours = qwen
    messages = [user_message(prompt, len(images))]
    inputs = _reference(ref, processor, messages, images)
    prepared = ours.prepare_images(images, Timings())
    seq = ours.build_prompt(messages, prepared.token_counts, grids=prepared.grids)
    assert seq.ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prepared.pixels, inputs["pixel_values"])
    positions, delta = ref.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    )
    assert torch.equal(seq.positions, positions[:, 0])
    assert int(seq.positions.max()) + 1 - len(seq.ids) == int(delta)
    measured = {}
    with torch.inference_mode():
        ref_feats = ref.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).pooler_output
        ours_feats = ours.encode_prepared(prepared, Timings())
        assert [f.shape for f in ours_feats] == [f.shape for f in ref_feats]
        scale = max(f.abs().max().item() for f in ref_feats)
        diff = max((a - b).abs().max().item() for a, b in zip(ours_feats, ref_feats))
        measured["features"] = diff / scale
        assert diff <= FEATURE_RTOL * scale
        ref_logits = ref(**inputs).logits
        cache = ours.model.new_cache(len(seq.ids))
        embeds = ours.model.embed(inputs["input_ids"], ours_feats)
        our_logits = ours.model.decoder(embeds, 0, cache, last_only=False, positions=seq.positions)
        scale = ref_logits.abs().max().item()
        diff = (our_logits - ref_logits).abs().max().item()
        measured["logits"] = diff / scale
        assert diff <= LOGIT_RTOL * scale
        ref_out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_tokens = [t for t in ref_out[0, inputs["input_ids"].shape[1] :].tolist() if t not in ours.stop_ids]
    answer = ours.ask(messages, images, SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0))
    assert answer.tokens == ref_tokens
    return answer, measured


def test_qwen2_vl_matches_transformers(qwen, make_test_image):
    wide, tall, small, big = (make_test_image(size=s, seed=i) for i, s in enumerate((WIDE, TALL, SMALL, BIG)))
    cases = [([wide], PROMPTS[0]), ([tall], PROMPTS[1]), ([big], PROMPTS[0]), ([small], PROMPTS[1]),
             ([wide, tall], PROMPTS[0]), ([big, small], PROMPTS[1])]
    worst = {"features": 0.0, "logits": 0.0}
    distinct = set()
    for images, prompt in cases:
        answer, measured = check_parity(qwen, images, prompt)
        distinct.add(len(set(answer.tokens)))
        worst = {k: max(worst[k], measured[k]) for k in worst}
    assert max(distinct) >= 8, distinct
    print(f"qwen2_vl: {worst}")


def test_text_only_parity(qwen):
    """No image: plain positions (all three streams equal to the slots), no offset."""
    _, ref, processor, ours = qwen
    messages = [user_message(PROMPTS[0])]
    inputs = _reference(ref, processor, messages, [])
    seq = ours.build_prompt(messages, [])
    assert seq.ids == inputs["input_ids"][0].tolist()
    assert torch.equal(seq.positions, torch.arange(len(seq.ids)).expand(3, -1))
    with torch.inference_mode():
        ref_out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_tokens = [t for t in ref_out[0, inputs["input_ids"].shape[1] :].tolist() if t not in ours.stop_ids]
    assert ours.ask(messages, [], SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0)).tokens == ref_tokens


def test_chat_text_turn_after_an_image_turn(qwen, make_test_image):
    """ChatSession (cached prefix, positions continued with the image's offset) against
    transformers generating over the whole conversation."""
    _, ref, processor, ours = qwen
    image = make_test_image(size=WIDE, seed=5)
    other = make_test_image(size=TALL, seed=6)
    opts = SamplingOptions(max_new_tokens=12, temperature=0)
    chat = ChatSession(ours, opts)
    chat.add_image(image)
    first = chat.ask(PROMPTS[0])
    assert chat.position_offset < 0
    second = chat.ask(PROMPTS[1])
    assert second.reused_tokens > 0
    chat.add_image(other)
    third = chat.ask("And now?")

    def reference_reply(messages, images):
        inputs = _reference(ref, processor, messages, images)
        with torch.inference_mode():
            out = ref.generate(**inputs, max_new_tokens=12, do_sample=False)
        return [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in ours.stop_ids]

    m1 = [user_message(PROMPTS[0], 1)]
    assert first.tokens == reference_reply(m1, [image])
    m2 = m1 + [assistant_message(first.text), user_message(PROMPTS[1])]
    assert second.tokens == reference_reply(m2, [image])
    m3 = m2 + [assistant_message(second.text), user_message("And now?", 1)]
    assert third.tokens == reference_reply(m3, [image, other])


def test_tensor_slot_step_equals_eager_step(qwen, make_test_image):
    """The capturable step (slot and position as tensors) gives the eager step's logits
    after an image prompt, whose decode positions are slot + delta."""
    _, _, _, ours = qwen
    images = [make_test_image(size=WIDE, seed=1)]
    messages = [user_message(PROMPTS[0], 1)]
    prepared = ours.prepare_images(images, Timings())
    seq = ours.build_prompt(messages, prepared.token_counts, grids=prepared.grids)
    delta = int(seq.positions.max()) + 1 - len(seq.ids)
    assert delta < 0
    model = ours.model
    with torch.inference_mode():
        visual = ours.encode_prepared(prepared, Timings())
        ids = torch.tensor([seq.ids])
        results = []
        for tensor_slots in (False, True):
            cache = model.new_cache(len(seq.ids) + 4)
            model.prefill(ids, visual, cache, 0, positions=seq.positions)
            out = []
            for k, token in enumerate((5, 17, 42)):
                slot = len(seq.ids) + k
                pos = torch.tensor([slot + delta])
                slots = torch.tensor([slot]) if tensor_slots else slot
                out.append(model.step(torch.tensor([[token]]), slots, cache, positions=pos))
            results.append(torch.stack(out))
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
        # the offset matters: plain slot positions give other logits
        cache = model.new_cache(len(seq.ids) + 4)
        model.prefill(ids, visual, cache, 0, positions=seq.positions)
        plain = model.step(torch.tensor([[5]]), len(seq.ids), cache)
        assert not torch.allclose(plain, results[0][0])


def test_context_refusal_names_both_numbers(qwen, make_test_image):
    _, _, _, ours = qwen
    image = make_test_image(size=BIG, seed=2)
    prepared = ours.prepare_images([image], Timings())
    messages = [user_message(PROMPTS[0], 1)]
    with pytest.raises(ContextLengthError, match=rf"{prepared.token_counts[0]} of them .* context is 30 tokens"):
        ours.build_prompt(messages, prepared.token_counts, 30, grids=prepared.grids)


def test_large_image_says_its_token_count(tmp_path, make_test_image):
    path = make_qwen2_vl_checkpoint(tmp_path / "big", max_pixels=28 * 28 * 2048)
    notes = []
    pipe = Pipeline.load(str(path), "cpu", notice=notes.append)
    prepared = pipe.prepare_images([make_test_image(size=(1100, 900), seed=1)], Timings())
    assert prepared.token_counts[0] > 1024
    assert any(f"{prepared.token_counts[0]} visual tokens" in n for n in notes)


# ---- the hub layout: Qwen/Qwen2-VL-2B-Instruct at full size, on meta ---------------------------

# config.json of Qwen/Qwen2-VL-2B-Instruct (transformers 4.45: the decoder's keys at the top level)
HUB_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536,
    "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def _to_hub_names(key: str) -> str:
    """transformers 5's names -> the hub repo's (4.45's): visual.*, model.*, lm_head."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_hub_key_layout_loads(layout, monkeypatch, tmp_path):
    from backends.cpu import CpuBackend
    from vlmcli import loader

    with torch.device("meta"):
        model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig.from_dict(HUB_2B))
    tensors = {k: (tuple(v.shape), "BF16") for k, v in model.state_dict().items()}
    if layout == "hub":
        tensors = {_to_hub_names(k): v for k, v in tensors.items()}
        tensors.pop("lm_head.weight", None)  # tied: the 2B repo stores embed_tokens only
        for expected in ("visual.patch_embed.proj.weight", "visual.blocks.31.attn.qkv.weight",
                         "visual.blocks.0.attn.proj.bias", "visual.blocks.0.mlp.fc1.weight",
                         "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight",
                         "model.layers.27.self_attn.q_proj.bias", "model.embed_tokens.weight", "model.norm.weight"):
            assert expected in tensors, expected
    assert tensors[[k for k in tensors if k.endswith("blocks.0.attn.qkv.weight")][0]][0] == (3840, 1280)
    (tmp_path / "config.json").write_text(json.dumps(HUB_2B))
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())
    assert loaded.config.text.tie_word_embeddings
    assert set(loaded.unused_tensors) <= {"lm_head.weight"}
    family = family_for(HUB_2B)
    ours = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    mapped = {family.weight_name(k): shape for k, (shape, _) in tensors.items()}
    for name, shape in ours.items():
        if name != "decoder.lm_head.weight":
            assert mapped[name] == shape, name
    assert ours["vision.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert ours["projector.mlp.0.weight"] == (5120, 5120)


def test_hub_config_reads_as_qwen2_vl():
    family, cfg = parse_config(HUB_2B)
    assert family.name == "Qwen2-VL" and describe(HUB_2B).startswith("Qwen2-VL")
    assert cfg.mrope_section == (16, 24, 24) and cfg.text.head_dim == 128
    assert cfg.text.rope.rope_type == "default" and cfg.text.rope.theta == 1e6
    assert cfg.text.sliding_window is None and cfg.text.n_kv_heads == 2
    assert cfg.vision.num_channels == 3 and cfg.vision.d_ff == 5120 and cfg.vision.d_out == 1536
    assert cfg.max_visual_tokens() == 1280  # max_pixels 28 * 28 * 1280
