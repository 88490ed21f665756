"""Our LLaVA family beyond 1.5 against transformers on the same tiny checkpoints: SigLIP and
the Qwen2 / Mistral / Gemma decoders inside `llava` (llava-interleave's shape), RoPE scaling,
LLaVA-NeXT and LLaVA-OneVision (anyres), compared as in test_parity_llava.py: input ids,
pixel values (bit-identical), vision features after projection and packing, logits at every
position, and greedy tokens (identical, and diverse enough to mean something).

Tolerances (fp32, CPU) are those of test_parity_llava.py: features within 1e-5 and logits
within 1e-4 of their scale. Measured on this machine: 0.0 for features and logits in every
variant below (the same float32 operations in the same order), and the greedy tokens are
identical with 20-24 distinct tokens out of 24. Mutations (no (1 + w) in Gemma's RMSNorm, no
embedding scale, a window off by one, image_newline before instead of after each row,
transposed tiles, nearest instead of bilinear shrinking) each fail these tests.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.family_checkpoints import MISTRAL_TEMPLATE, make_family_checkpoint  # noqa: E402
from vlmcli.generate import SamplingOptions, Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import build_sequence, user_message  # noqa: E402

FEATURE_RTOL = 1e-5  # max |ours - ref| / max |ref|
LOGIT_RTOL = 1e-4
NEW_TOKENS = 24

_REFERENCE_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


@pytest.fixture(scope="session")
def make_family(tmp_path_factory):
    built = {}

    def factory(**kwargs):
        key = json.dumps(kwargs, sort_keys=True, default=repr)
        if key not in built:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            built[key] = make_family_checkpoint(tmp_path_factory.mktemp(f"family-{digest}"), **kwargs)
        return built[key]

    return factory


class _ImageOnlyOnevisionProcessor(transformers.LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor (which needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def _reference(path):
    cfg = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, _REFERENCE_CLASSES[cfg["model_type"]])
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    if cfg["model_type"] == "llava_onevision":
        # AutoProcessor would also build the video processor, which needs torchvision
        processor = _ImageOnlyOnevisionProcessor(
            image_processor=transformers.AutoImageProcessor.from_pretrained(path),
            tokenizer=transformers.AutoTokenizer.from_pretrained(path),
            video_processor=None,
            chat_template=json.loads((path / "chat_template.json").read_text())["chat_template"],
            **{k: v for k, v in json.loads((path / "processor_config.json").read_text()).items() if k != "processor_class"},
        )
    else:
        processor = transformers.AutoProcessor.from_pretrained(path)
    return model, processor


def _ref_image_features(ref, inputs):
    kwargs = {}
    if "image_sizes" in inputs:
        kwargs["image_sizes"] = inputs["image_sizes"]
    if "batch_num_images" in inputs:
        kwargs["batch_num_images"] = inputs["batch_num_images"]
    out = ref.model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs)
    return list(out.pooler_output)


def check_parity(path, images, prompt="What is in the picture?", new_tokens=NEW_TOKENS):
    """Compare every stage with transformers; returns (answer, measured differences)."""
    from PIL import Image

    ref, processor = _reference(path)
    ours = Pipeline.load(str(path), "cpu")
    messages = [user_message(prompt, len(images))]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = [Image.open(p).convert("RGB") for p in images]
    if isinstance(processor, transformers.LlavaOnevisionProcessor) and pil:
        # images nested per prompt, so that several images in one prompt are known as such
        # (batch_num_images); OneVision encodes those at base resolution only
        pil = [pil]
    inputs = processor(text=text, images=pil or None, return_tensors="pt")

    # 1. the token sequence, each image's slot expanded to its own count
    prepared = ours.prepare_images(images, Timings())
    seq = build_sequence(
        ours.tokenizer,
        messages,
        image_token_id=ours.config.image_token_id,
        tokens_per_image=prepared.token_counts,
        context_length=ours.context_length,
    )
    assert seq.ids == inputs["input_ids"][0].tolist()

    # 2. pixel values, view by view
    ref_pixels = inputs["pixel_values"]
    if ref_pixels.dim() == 5:  # anyres: (images, padded views, 3, H, W)
        assert [tuple(s) for s in inputs["image_sizes"].tolist()] == prepared.image_sizes
        ref_pixels = torch.cat([p[:n] for p, n in zip(ref_pixels, prepared.views_per_image)])
    assert torch.equal(prepared.pixels, ref_pixels)

    measured = {}
    with torch.inference_mode():
        # 3. visual tokens per image (projected, packed with image_newline for anyres)
        ref_feats = _ref_image_features(ref, inputs)
        our_feats = ours.encode_prepared(prepared, Timings())
        our_feats = list(our_feats)
        assert [f.shape for f in our_feats] == [f.shape for f in ref_feats]
        assert [f.shape[0] for f in our_feats] == prepared.token_counts
        scale = max(f.abs().max().item() for f in ref_feats)
        diff = max((a - b).abs().max().item() for a, b in zip(our_feats, ref_feats))
        measured["features"] = diff / scale
        assert diff <= FEATURE_RTOL * scale

        # 4. logits at every position
        ref_logits = ref(**inputs).logits
        cache = ours.model.decoder.new_cache(len(seq.ids))
        our_logits = ours.model(
            inputs["input_ids"],
            prepared.pixels,
            cache,
            last_only=False,
            image_sizes=prepared.image_sizes,
            views_per_image=prepared.views_per_image,
        )
        scale = ref_logits.abs().max().item()
        diff = (our_logits - ref_logits).abs().max().item()
        measured["logits"] = diff / scale
        assert diff <= LOGIT_RTOL * scale

        # 5. greedy tokens
        ref_out = ref.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    ref_tokens = ref_out[0, inputs["input_ids"].shape[1] :].tolist()
    answer = ours.ask(messages, images, SamplingOptions(max_new_tokens=new_tokens, temperature=0))
    eos = set(ours.stop_ids)
    assert answer.tokens == [t for t in ref_tokens if t not in eos]
    return answer, measured


def _assert_diverse(answer, at_least=8):
    # a random model that repeats one token would make the token comparison meaningless
    assert len(set(answer.tokens)) >= at_least, answer.tokens
    assert answer.finish_reason == "length"


# ---- llava-interleave: SigLIP + Qwen2 in `llava` -------------------------------------------

INTERLEAVE = {
    "siglip-qwen2": dict(),
    "hub-layout-tied": dict(key_layout="hub", text_overrides=dict(tie_word_embeddings=True)),
    "module-layout-gqa1": dict(key_layout="module", text_overrides=dict(num_key_value_heads=1)),
    # use_sliding_window on the upper layer only (max_window_layers=1), window shorter than the prompt
    "qwen2-sliding": dict(text_overrides=dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "siglip-default-layers": dict(strategy="default", feature_layer=[-3, -1]),
    # config.json as sparse as llava-interleave-qwen-0.5b-hf's (Qwen2/SigLIP class defaults implied)
    "legacy-config": dict(legacy_config=True),
}


@pytest.mark.parametrize("variant", list(INTERLEAVE), ids=list(INTERLEAVE))
def test_interleave_matches_transformers(make_family, make_test_image, variant):
    answer, measured = check_parity(make_family(**INTERLEAVE[variant]), [make_test_image(size=(64, 48))])
    _assert_diverse(answer)


# ---- Mistral and Gemma decoders -------------------------------------------------------------

DECODERS = {
    # a 16-token window on every layer: the prompt alone is longer
    "mistral-sliding": dict(vision="clip", text="mistral", text_overrides=dict(sliding_window=16)),
    "mistral-no-window": dict(vision="clip", text="mistral"),
    # GeGLU, sqrt(d) embedding scale, (1 + w) RMSNorm, head_dim 24 != 64 / 4, MQA, tied
    "gemma": dict(vision="clip", text="gemma"),
    # Gemma's original configs say hidden_act "gelu" and mean the tanh approximation
    "gemma-siglip-legacy-gelu": dict(
        vision="siglip", text="gemma", legacy_config=True, config_json_overrides=dict(text_config=dict(hidden_act="gelu"))
    ),
}


@pytest.mark.parametrize("variant", list(DECODERS), ids=list(DECODERS))
def test_decoders_match_transformers(make_family, make_test_image, variant):
    answer, measured = check_parity(make_family(**DECODERS[variant]), [make_test_image(size=(64, 48))])
    _assert_diverse(answer)


# ---- RoPE scaling ---------------------------------------------------------------------------

ROPE = {
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    # a 40-position model: the prefill (51 tokens) already outgrows it, then every decode
    # step does; our context is 40 x factor
    "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
    "llama3": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=10000.0,
    ),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, rope_theta=10000.0),
}


@pytest.mark.parametrize("kind", list(ROPE), ids=list(ROPE))
def test_rope_scaling_matches_transformers(make_family, make_test_image, kind):
    overrides = dict(rope_parameters=dict(ROPE[kind]))
    if kind == "dynamic":
        overrides["max_position_embeddings"] = 40
    path = make_family(vision="clip", text="llama", text_overrides=overrides)
    answer, measured = check_parity(path, [make_test_image(size=(64, 48))])
    _assert_diverse(answer)
    if kind == "dynamic":  # the path past the trained length was taken, prefill and decode
        assert answer.prompt_tokens > 40


# ---- LLaVA-NeXT: anyres tiles, unpadding, image_newline --------------------------------------

NEXT = {
    # llava-v1.6-vicuna-7b-hf's shape: CLIP, Llama, vicuna template, saved key names
    "vicuna-landscape": (dict(model_type="llava_next", vision="clip", text="llama"), [(64, 48)]),
    # llava-v1.6-mistral-7b-hf's shape: hub key names, [INST] template, a portrait image
    "mistral-portrait-hub": (
        dict(model_type="llava_next", vision="clip", text="mistral", key_layout="hub", legacy_config=True,
             chat_template=MISTRAL_TEMPLATE, text_overrides=dict(sliding_window=32)),
        [(40, 70)],
    ),
    # two images of different sizes, so different token counts, in one prompt
    "two-images": (dict(model_type="llava_next", vision="clip", text="llama"), [(97, 41), (30, 30)]),
    "siglip-qwen2-module": (
        dict(model_type="llava_next", vision="siglip", text="qwen2", key_layout="module"), [(50, 61)]
    ),
}


@pytest.mark.parametrize("variant", list(NEXT), ids=list(NEXT))
def test_llava_next_matches_transformers(make_family, make_test_image, variant):
    kwargs, sizes = NEXT[variant]
    images = [make_test_image(size=s, seed=i + 1) for i, s in enumerate(sizes)]
    answer, measured = check_parity(make_family(**kwargs), images)
    _assert_diverse(answer)


# ---- LLaVA-OneVision: anyres_max_N, several images get the base view only ----------------------

ONEVISION = {
    # llava-onevision-qwen2-0.5b-ov-hf's shape (SigLIP, Qwen2, ChatML), grids up to 3x3 tiles
    "qwen2-landscape": (dict(model_type="llava_onevision"), [(64, 48)]),
    # anyres_max_1: a 2x2 grid holds 4 tiles' worth, so the feature map is shrunk (bilinear)
    "max1-shrinks-hub": (dict(model_type="llava_onevision", vision_aspect_ratio="anyres_max_1", key_layout="hub"), [(70, 60)]),
    # two images in one prompt: each is padded to a square, base view only, one newline
    "two-images": (dict(model_type="llava_onevision"), [(97, 41), (40, 70)]),
}


@pytest.mark.parametrize("variant", list(ONEVISION), ids=list(ONEVISION))
def test_llava_onevision_matches_transformers(make_family, make_test_image, variant):
    kwargs, sizes = ONEVISION[variant]
    images = [make_test_image(size=s, seed=i + 1) for i, s in enumerate(sizes)]
    answer, measured = check_parity(make_family(**kwargs), images)
    _assert_diverse(answer)


# ---- the seed's projection types -------------------------------------------------------------


def test_linear_projector_matches_transformers_parts(make_family, make_test_image, tmp_path):
    """projector_type "linear" (original LLaVA): one Linear from vision features to the decoder.

    transformers' llava has no linear projector, so the reference is assembled from its
    parts: its SigLIP tower's selected hidden states, the checkpoint's linear_1, and its
    decoder run on the resulting input embeddings."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = make_family()
    path = tmp_path / "linear"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["projector_type"] = "linear"
    (path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "linear_2" not in k}, path / "model.safetensors")

    ours = Pipeline.load(str(path), "cpu")
    assert ours.config.projection.projection_type == "linear"
    assert not hasattr(ours.model.projector, "linear_2")
    ref, processor = _reference(src)  # the MLP model: its tower and decoder are the same
    image = make_test_image(size=(64, 48))
    messages = [user_message("What is in the picture?", 1)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from PIL import Image

    inputs = processor(text=text, images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.inference_mode():
        hidden = ref.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-1]
        visual = ref.model.multi_modal_projector.linear_1(hidden)  # "full": every patch
        ids = inputs["input_ids"]
        embeds = ref.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == ref.config.image_token_id)[..., None], visual)
        ref_logits = ref(inputs_embeds=embeds).logits
        ref_out = ref.generate(inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False)
        our_logits = ours.model(ids, inputs["pixel_values"], ours.model.decoder.new_cache(ids.shape[1]), last_only=False)
    scale = ref_logits.abs().max().item()
    assert (our_logits - ref_logits).abs().max().item() <= LOGIT_RTOL * scale
    answer = ours.ask(messages, [image], SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0))
    assert answer.tokens == [t for t in ref_out[0].tolist() if t not in ours.stop_ids]
    _assert_diverse(answer)


def test_checkpoint_without_preprocessor_config_uses_the_towers_recipe(make_family, make_test_image, tmp_path):
    """No preprocessor_config.json: a SigLIP tower gets SigLIP's plain resize and 0.5 statistics."""
    import shutil

    from PIL import Image

    path = tmp_path / "no-preprocessor"
    shutil.copytree(make_family(), path)
    (path / "preprocessor_config.json").unlink()
    notices = []
    ours = Pipeline.load(str(path), "cpu", notice=notices.append)
    assert any("no preprocessor_config.json" in n for n in notices)
    image = make_test_image(size=(64, 48))
    prepared = ours.prepare_images([image], Timings())
    ref = transformers.SiglipImageProcessorPil(size={"height": 30, "width": 30})
    expected = ref(images=[Image.open(image).convert("RGB")], return_tensors="pt")["pixel_values"]
    assert torch.equal(prepared.pixels, expected)


def test_sliding_window_decode_equals_full_forward(make_family, make_test_image):
    """With a sliding window, the KV-cached path (a prefill, a chunk at pos > 0, then one
    token at a time) gives the logits of one full forward pass."""
    pipe = Pipeline.load(str(make_family(**DECODERS["mistral-sliding"])), "cpu")
    model = pipe.model
    prepared = pipe.prepare_images([make_test_image()], Timings())
    seq = build_sequence(
        pipe.tokenizer,
        [user_message("hello there", 1)],
        image_token_id=pipe.config.image_token_id,
        tokens_per_image=prepared.token_counts,
        context_length=pipe.context_length,
    )
    ids = torch.tensor([seq.ids + [5, 17, 99, 3, 42, 7]])
    n = len(seq.ids)
    assert n > 16  # the window (16) cuts into the prompt
    with torch.inference_mode():
        full = model(ids, prepared.pixels, model.decoder.new_cache(ids.shape[1]), last_only=False)
        no_cache = model.decoder(model.embed(ids, model.encode_images(prepared.pixels)), 0, None, last_only=False)
        cache = model.decoder.new_cache(ids.shape[1])
        parts = [model(ids[:, :n], prepared.pixels, cache, last_only=False)]
        parts.append(model.decoder(model.decoder.embed_tokens(ids[:, n : n + 3]), n, cache, last_only=False))
        for i in range(n + 3, ids.shape[1]):
            parts.append(model.decoder(model.decoder.embed_tokens(ids[:, i : i + 1]), i, cache))
    stepped = torch.cat(parts, dim=1)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5 * full.abs().max().item())
    torch.testing.assert_close(no_cache, full, rtol=0, atol=1e-5 * full.abs().max().item())


def test_chat_session_gives_each_anyres_image_its_own_count(make_family, make_test_image):
    """A LLaVA-NeXT conversation with two images of different shapes (so different token
    counts) answers as a fresh run over the same messages does."""
    from vlmcli.chat import ChatSession

    pipe = Pipeline.load(str(make_family(**NEXT["vicuna-landscape"][0])), "cpu")
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=8))
    session.add_image(make_test_image(size=(64, 48), seed=1))
    first = session.ask("What is in this picture?")
    assert first.tokens == pipe.ask(session.messages[:-1], session.images, session.opts).tokens
    session.add_image(make_test_image(size=(40, 70), seed=2))
    second = session.ask("Compare the two pictures.")
    assert second.tokens == pipe.ask(session.messages[:-1], session.images, session.opts).tokens
    assert second.reused_tokens >= first.prompt_tokens
