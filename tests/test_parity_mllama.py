"""Llama 3.2 Vision (mllama) against transformers on a tiny random checkpoint
(tests/mllama_checkpoints.py): pixel values, aspect_ratio_ids and aspect_ratio_mask of
MllamaImageProcessor bit for bit; prompt ids equal to MllamaProcessor's; vision features
and logits at every position within a measured tolerance; 24 greedy tokens identical (1 tile,
several tiles, non-square, two images, text only, a text turn after an image turn in chat,
where nothing of the image is recomputed); the tensor-slot step equal to the eager one;
the CLI's --json tokens; cpu-bf16, int4 and int8 (the tower and projector kept dense); and the
hub key layout of meta-llama/Llama-3.2-11B-Vision-Instruct on meta."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.mllama_checkpoints import (  # noqa: E402
    hub_config_11b,
    hub_config_90b,
    make_mllama_checkpoint,
    reference_processor,
)
from vlmcli.chat import ChatSession  # noqa: E402
from vlmcli.families import describe, family_for, parse_config  # noqa: E402
from vlmcli.generate import SamplingOptions, Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

# measured on this checkpoint in float32 on CPU (worst case over the cases below): features
# 7.3e-7, logits 1.2e-6 of the largest reference value (the tower's attention runs as two
# unmasked products per image where transformers masks one; 0.0 with its mask)
FEATURE_RTOL = 1e-5  # max |ours - ref| / max |ref|
LOGIT_RTOL = 1e-5
NEW_TOKENS = 24
PROMPT = "What is in the picture?"
# (width, height): 1 tile (smaller than a tile, upscaled), 1 tile exactly, 2x2 tiles,
# wide (1x4) and tall (3x1 / 4x1) non-square
ONE_SMALL, ONE, SQUARE4, WIDE, TALL = (20, 17), (28, 28), (60, 56), (130, 30), (30, 75)


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    path = make_mllama_checkpoint(tmp_path_factory.mktemp("mllama"))
    ref = transformers.MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref, reference_processor(path), Pipeline.load(str(path), "cpu")


def _pil(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _reference(processor, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=[_pil(p) for p in images] or None, return_tensors="pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("size", [ONE_SMALL, ONE, SQUARE4, WIDE, TALL, (400, 90), (13, 300)])
def test_pixels_are_mllama_image_processors(mllama, make_test_image, size):
    _, _, processor, ours = mllama
    image = make_test_image(size=size, seed=3)
    prepared = ours.prepare_images([image], Timings())
    expected = processor.image_processor(images=[[_pil(image)]], return_tensors="pt")
    assert prepared.pixels.dtype == torch.float32
    assert torch.equal(prepared.pixels, expected["pixel_values"][0])
    model = ours.model
    assert torch.equal(model.aspect_ratio_ids(prepared.grids), expected["aspect_ratio_ids"][0])
    assert torch.equal(model.tile_mask(prepared.grids).long(), expected["aspect_ratio_mask"][0])
    assert prepared.views_per_image == expected["num_tiles"][0]
    assert prepared.token_counts == [1]


def _check_case(mllama, images, messages):
    """Features, logits at every position and greedy tokens against transformers."""
    _, ref, processor, ours = mllama
    inputs = _reference(processor, messages, images)
    prepared = ours.prepare_prompt(messages, images, Timings())[1]
    seq = ours.build_prompt(messages, [1] * len(images))
    assert seq.ids == inputs["input_ids"][0].tolist()
    model = ours.model
    with torch.inference_mode():
        if images:
            expected = ref.model.vision_model(
                inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
            ).last_hidden_state[0]
            got = model.vision(prepared.pixels, model.aspect_ratio_ids(prepared.grids), model.tile_mask(prepared.grids))
            assert _rel(got, expected) <= FEATURE_RTOL
        ref_logits = ref(**inputs).logits
        pixels = prepared.pixels if images else None
        logits = model(torch.tensor([seq.ids]), pixels, None, last_only=False, grids=prepared.grids if images else None)
        assert _rel(logits, ref_logits) <= LOGIT_RTOL
        ref_tokens = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    ref_tokens = ref_tokens[0, inputs["input_ids"].shape[1] :].tolist()
    answer = ours.ask(messages, images, SamplingOptions(max_new_tokens=NEW_TOKENS))
    assert answer.tokens == ref_tokens[: len(answer.tokens)]
    assert len(answer.tokens) >= 16 and len(set(answer.tokens)) > 4  # the case says something
    return answer


@pytest.mark.parametrize("size", [ONE_SMALL, SQUARE4, WIDE, TALL])
def test_one_image_matches_transformers(mllama, make_test_image, size):
    image = make_test_image(size=size, seed=1)
    _check_case(mllama, [image], [user_message(PROMPT, 1)])


def test_two_images_match_transformers(mllama, make_test_image):
    """Two <|image|> in a row: both images are seen by all the text after them."""
    images = [make_test_image(size=WIDE, seed=1), make_test_image(size=ONE_SMALL, seed=2)]
    _check_case(mllama, images, [user_message(PROMPT, 2)])


def test_images_in_two_turns_match_transformers(mllama, make_test_image):
    """An image per user turn: the second turn's text sees the second image only."""
    images = [make_test_image(size=SQUARE4, seed=1), make_test_image(size=TALL, seed=2)]
    messages = [
        user_message("Look at this.", 1),
        {"role": "assistant", "content": [{"type": "text", "text": "I see it."}]},
        user_message(PROMPT, 1),
    ]
    _check_case(mllama, images, messages)


def test_text_only_matches_transformers(mllama):
    """No image: the cross-attention layers are skipped, as transformers skips them."""
    _check_case(mllama, [], [user_message(PROMPT)])


def test_images_change_the_answer(mllama, make_test_image):
    """The gates are open: what the image shows reaches the logits."""
    _, _, _, ours = mllama
    opts = SamplingOptions(max_new_tokens=8)
    a = ours.describe([make_test_image(size=WIDE, seed=1)], PROMPT, opts).tokens
    b = ours.describe([make_test_image(size=WIDE, seed=5)], PROMPT, opts).tokens
    c = ours.ask([user_message(PROMPT)], [], opts).tokens
    assert a != b and a != c


def test_chat_text_turn_after_an_image_turn(mllama, make_test_image):
    """A follow-up turn without an image reuses the image's cross-attention keys and values
    from the cache: neither the vision tower nor the cross-attention K/V projections run,
    and the reply is transformers' for the whole conversation."""
    _, ref, processor, ours = mllama
    image = make_test_image(size=SQUARE4, seed=4)
    session = ChatSession(ours, SamplingOptions(max_new_tokens=NEW_TOKENS))
    session.add_image(image)
    session.ask(PROMPT)
    calls = {"vision": 0, "k_proj": 0}
    model = ours.model
    hooks = [model.vision.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))]
    for block in model.decoder.layers:
        if hasattr(block, "cross_attn"):
            hooks.append(block.cross_attn.k_proj.register_forward_hook(
                lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1)))
    try:
        reply = session.ask("Tell me more.")
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"vision": 0, "k_proj": 0}
    assert reply.reused_tokens > 0
    inputs = _reference(processor, session.messages[:-1], [image])
    with torch.inference_mode():
        out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert reply.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()[: len(reply.tokens)]
    assert len(reply.tokens) >= 16


@pytest.mark.parametrize("first_image", [True, False])
def test_chat_image_in_a_later_turn(mllama, make_test_image, first_image):
    """A second image in the second turn (or a first image after a text-only turn): only
    the new image goes through the tower and the cross-attention K/V projections (once per
    cross layer), and the reply is transformers' for the whole conversation (the header
    tokens, which see no image, attend to every image there, so ours are run again)."""
    _, ref, processor, ours = mllama
    images = [make_test_image(size=WIDE, seed=2), make_test_image(size=TALL, seed=3)]
    if not first_image:
        images = images[1:]
    session = ChatSession(ours, SamplingOptions(max_new_tokens=NEW_TOKENS))
    if first_image:
        session.add_image(images[0])
    session.ask("Look at this." if first_image else "Hello there.")
    calls = {"vision": 0, "k_proj": 0}
    model = ours.model
    hooks = [model.vision.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))]
    for block in model.decoder.layers:
        if hasattr(block, "cross_attn"):
            hooks.append(block.cross_attn.k_proj.register_forward_hook(
                lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1)))
    try:
        session.add_image(images[-1])
        reply = session.ask(PROMPT)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"vision": 1, "k_proj": 2}  # one image, two cross-attention layers
    inputs = _reference(processor, session.messages[:-1], images)
    with torch.inference_mode():
        out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert reply.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()[: len(reply.tokens)]
    assert len(reply.tokens) >= 16


def test_tensor_slot_step_equals_eager_step(mllama, make_test_image):
    """The capturable step (slot as a tensor; the cross-attention K/V and the image mask
    read from the cache) gives the eager step's logits."""
    _, _, _, ours = mllama
    images = [make_test_image(size=WIDE, seed=1)]
    messages = [user_message(PROMPT, 1)]
    seq, prepared = ours.prepare_prompt(messages, images, Timings())
    model = ours.model
    with torch.inference_mode():
        visual = ours.encode_prepared(prepared, Timings())
        ids = torch.tensor([seq.ids])
        results = []
        for tensor_slots in (False, True):
            cache = model.new_cache(len(seq.ids) + 4)
            model.prefill(ids, visual, cache, 0)
            out = []
            for k, token in enumerate((5, 17, 42)):
                slot = len(seq.ids) + k
                out.append(model.step(torch.tensor([[token]]), torch.tensor([slot]) if tensor_slots else slot, cache))
            results.append(torch.stack(out))
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_batched_caches_are_refused_in_words(mllama):
    """The server's batched cache (rows per sequence) would lose the images: refused."""
    from vlmcli.errors import UnsupportedModelError

    model = mllama[3].model
    with pytest.raises(UnsupportedModelError, match="one sequence at a time"):
        model.new_cache(32, batch=4)
    with pytest.raises(UnsupportedModelError, match="cannot batch"):
        model.new_cache(32).view(slice(0, 1))
    # vlm serve's engine finds out when it starts, even for batches of one, not per request
    from vlmcli.server.engine import Engine

    with pytest.raises(UnsupportedModelError, match="cannot batch"):
        Engine(mllama[3], max_batch=1)


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens(mllama, make_test_image):
    _, _, _, ours = mllama
    image = make_test_image(size=WIDE, seed=1)
    opts = SamplingOptions(max_new_tokens=12)
    eager = ours.describe([image], PROMPT, opts).tokens
    assert ours.compile_step()
    try:
        assert ours.describe([image], PROMPT, opts).tokens == eager
    finally:
        ours.step = None


def test_cli_describe_json_gives_the_reference_tokens(mllama, make_test_image, capsys):
    from vlmcli.cli import main

    path, ref, processor, _ = mllama
    image = make_test_image(size=WIDE, seed=1)
    code = main(["describe", str(image), "-m", str(path), "-p", PROMPT, "--max-tokens", "16", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)
    inputs = _reference(processor, [user_message(PROMPT, 1)], [image])
    with torch.inference_mode():
        expected = ref.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert record["tokens"] == expected.tolist()[: len(record["tokens"])]
    assert record["image_tokens"] == 1 and record["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_cpu_bf16_runs_close_to_fp32(mllama, make_test_image):
    path, _, _, ours = mllama
    image = make_test_image(size=SQUARE4, seed=1)
    bf16 = Pipeline.load(str(path), "cpu-bf16")
    assert bf16.model.decoder.layers[1].cross_attn.q_proj.weight.dtype == torch.bfloat16
    messages = [user_message(PROMPT, 1)]
    seq, prepared = ours.prepare_prompt(messages, [image], Timings())
    with torch.inference_mode():
        logits = {}
        for name, pipe in (("fp32", ours), ("bf16", bf16)):
            cache = pipe.model.new_cache(len(seq.ids) + 1)
            logits[name] = pipe.model.prefill(torch.tensor([seq.ids]), pipe.encode_prepared(prepared, Timings()), cache).float()
    # bf16 keeps 8 bits of mantissa through the tower and 5 layers of random weights:
    # measured 0.040 here, up to 0.134 at other positions and images
    assert _rel(logits["bf16"], logits["fp32"]) < 0.15
    assert logits["bf16"].argmax() == logits["fp32"].argmax()
    assert len(bf16.describe([image], PROMPT, SamplingOptions(max_new_tokens=8)).tokens) == 8


@pytest.mark.parametrize("backend", ["int4", "int8"])
def test_bnb_keeps_the_tower_and_projector_dense(mllama, make_test_image, backend):
    pytest.importorskip("bitsandbytes")
    from torch import nn

    path, _, _, _ = mllama
    pipe = Pipeline.load(str(path), backend)
    model = pipe.model
    dense = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert any(n.startswith("vision.transformer.") for n in dense)
    assert "projector" in dense
    cross = model.decoder.layers[1]
    assert type(cross.cross_attn.q_proj) is not nn.Linear  # the decoder's layers are quantized
    assert all(pipe.family.keep_dense(n) for n in dense if not n.startswith("decoder.layers"))
    answer = pipe.describe([make_test_image(size=WIDE, seed=1)], PROMPT, SamplingOptions(max_new_tokens=6))
    assert len(answer.tokens) == 6


# ---- the hub layout: meta-llama/Llama-3.2-11B-Vision-Instruct at full size, on meta -----------


def _to_hub_names(key: str) -> str:
    """transformers 5's in-memory names -> the hub repo's (4.45's)."""
    for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@pytest.mark.parametrize("size, layout", [("11B", "hub"), ("11B", "transformers5"), ("90B", "hub")])
def test_hub_key_layout_loads(size, layout, monkeypatch, tmp_path):
    from backends.cpu import CpuBackend
    from vlmcli import loader

    config = hub_config_11b() if size == "11B" else hub_config_90b()
    d, n_cross, n_self = (4096, 8, 32) if size == "11B" else (8192, 20, 80)
    with torch.device("meta"):
        model = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig.from_dict(config))
    tensors = {k: (tuple(v.shape), "BF16") for k, v in model.state_dict().items()}
    if layout == "hub":
        tensors = {_to_hub_names(k): v for k, v in tensors.items()}
        for expected in ("vision_model.patch_embedding.weight", "vision_model.gated_positional_embedding.tile_embedding.weight",
                         "vision_model.global_transformer.layers.7.gate_ffn", "multi_modal_projector.weight",
                         "language_model.model.layers.3.cross_attn.k_norm.weight",
                         "language_model.model.layers.38.cross_attn_mlp_gate", "language_model.lm_head.weight"):
            assert expected in tensors, expected
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())
    assert loaded.unused_tensors == []  # nothing left over
    family = family_for(config)
    ours = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    mapped = {family.weight_name(k): shape for k, (shape, _) in tensors.items()}
    assert mapped == ours  # every tensor has its place, and every parameter its tensor
    assert ours["decoder.embed_tokens.weight"] == (128264, d)  # vocab + 8
    assert ours["decoder.lm_head.weight"] == (128256, d)
    assert ours["vision.gated_positional_embedding.tile_embedding.weight"] == (9, 4 * 1601 * 1280)
    assert ours["projector.weight"] == (d, 7680)
    assert sum(1 for b in loaded.model.decoder.layers if hasattr(b, "cross_attn")) == n_cross
    cache = loaded.model.new_cache(16)
    assert cache.k.shape[0] == n_self and cache.xk.shape[0] == n_cross  # self-attention layers only


def test_hub_config_reads_as_mllama():
    family, cfg = parse_config(hub_config_11b())
    assert family.name == "Llama 3.2 Vision" and describe(hub_config_11b()).startswith("Llama 3.2 Vision")
    assert cfg.text.rope.rope_type == "llama3" and cfg.text.rope.theta == 500000.0
    assert cfg.vision.patches_per_tile == 1601 and cfg.projection.projection_type == "decoder_cross_attention"
    assert cfg.self_attention_layers[:4] == (0, 1, 2, 4)


def test_info_names_the_projection(mllama):
    from vlmcli.info import model_info

    path, _, _, _ = mllama
    info = model_info(str(path))
    assert info["family"] == "Llama 3.2 Vision"
    assert info["projector"]["type"] == "decoder_cross_attention"


@pytest.fixture(scope="module")
def hub_template(mllama, tmp_path_factory):
    """The tiny checkpoint with the 11B-Vision-Instruct chat template."""
    import shutil

    from tests.mllama_checkpoints import HUB_CHAT_TEMPLATE

    path = tmp_path_factory.mktemp("mllama-hub-template") / "model"
    shutil.copytree(mllama[0], path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": HUB_CHAT_TEMPLATE}))
    return path, reference_processor(path), Pipeline.load(str(path), "cpu")


@pytest.mark.parametrize("case", ["image", "text", "chat"])
def test_the_hub_chat_template_renders_as_transformers(hub_template, make_test_image, case):
    """Images: no system turn; text only: the dated system turn (strftime_now); a chat
    with the image in the first turn."""
    path, processor, ours = hub_template
    image = make_test_image(size=WIDE, seed=1)
    messages, images = {
        "image": ([user_message(PROMPT, 1)], [image]),
        "text": ([user_message(PROMPT)], []),
        "chat": ([user_message(PROMPT, 1), {"role": "assistant", "content": [{"type": "text", "text": "A box."}]},
                  user_message("And the colour?")], [image]),
    }[case]
    seq = ours.build_prompt(messages, [1] * len(images))
    assert seq.ids == _reference(processor, messages, images)["input_ids"][0].tolist()
    if case == "text":
        assert "Cutting Knowledge Date" in ours.tokenizer.decode(seq.ids)
    assert ours.ask(messages, images, SamplingOptions(max_new_tokens=4)).tokens


def test_the_hub_template_refuses_a_system_turn_with_images(hub_template, make_test_image):
    from vlmcli.tokenizer import ChatTemplateError

    _, _, ours = hub_template
    messages = [{"role": "system", "content": "Be brief."}, user_message(PROMPT, 1)]
    with pytest.raises(ChatTemplateError, match="incompatible with system messages"):
        ours.build_prompt(messages, [1])
