"""InternVL (transformers' `internvl` layout) against transformers on tiny random checkpoints
(tests/internvl_checkpoints.py): the pixel values of GotOcr2ImageProcessor's dynamic tiling
(bit-identical), InternVLProcessor's input ids, the visual tokens after pixel shuffle and
projection, the logits at every position, and greedy tokens (identical, >= 8 distinct in 24),
for two prompts each with one tile and with several tiles plus a thumbnail; a vision tower
with layer norm, and one with QK-norm and RMS norm.

Tolerances (fp32, CPU): features within 1e-5 and logits within 1e-4 of their scale, as the
LLaVA parity tests. Measured on this machine: 0.0 for both in every variant (the same
float32 operations in the same order), greedy tokens identical with 19-23 distinct of 24.

Also: the hub layout of OpenGVLab/InternVL3-1B-hf and -8B-hf (config.json reconstructed
from transformers' InternVLConfig defaults and the converted repos; no network) maps every
tensor of transformers' model onto ours with the right shape, at full size on `meta`.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.internvl_checkpoints import make_internvl_checkpoint, reference_processor  # noqa: E402
from vlmcli.families import describe, family_for, parse_config  # noqa: E402
from vlmcli.generate import SamplingOptions, Timings  # noqa: E402
from vlmcli.pipeline import Pipeline  # noqa: E402
from vlmcli.sequence import user_message  # noqa: E402

FEATURE_RTOL = 1e-5  # max |ours - ref| / max |ref|
LOGIT_RTOL = 1e-4
NEW_TOKENS = 24
PROMPTS = ("What is in the picture?", "Describe the colours and shapes you see.")
# (width, height): a small square image is one tile; the others a grid plus a thumbnail
ONE_TILE = (30, 30)
SEVERAL_TILES = [(64, 48), (40, 90)]


@pytest.fixture(scope="session")
def make_internvl(tmp_path_factory):
    built = {}

    def factory(**kwargs):
        key = json.dumps(kwargs, sort_keys=True, default=repr)
        if key not in built:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            built[key] = make_internvl_checkpoint(tmp_path_factory.mktemp(f"internvl-{digest}"), **kwargs)
        return built[key]

    return factory


def _pil(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ---- pixels: GotOcr2ImageProcessor's tiling, bit for bit --------------------------------------


@pytest.mark.parametrize("max_patches", [6, 2, 12, 1])
@pytest.mark.parametrize("size", [ONE_TILE, (64, 48), (40, 90), (97, 41), (33, 35)])
def test_tiles_are_gotocr2s(make_internvl, make_test_image, size, max_patches):
    """Our views equal GotOcr2ImageProcessor(crop_to_patches=True)'s, pixel for pixel, and
    the count InternVLProcessor would give; max_patches read from the image settings."""
    from vlmcli.families.internvl.processor import InternVLProcessor

    path = make_internvl(max_patches=max_patches)
    pipe = Pipeline.load(str(path), "cpu")
    assert isinstance(pipe.processor, InternVLProcessor) and pipe.processor.max_patches == max_patches
    image = make_test_image(size=size, seed=3)
    prepared = pipe.prepare_images([image], Timings())
    ref = transformers.GotOcr2ImageProcessor.from_pretrained(path)
    expected = ref(images=[_pil(image)], crop_to_patches=True, return_tensors="pt")
    assert prepared.pixels.dtype == torch.float32
    assert torch.equal(prepared.pixels, expected["pixel_values"])
    assert prepared.views_per_image == expected["num_patches"].tolist()
    assert prepared.token_counts == [16 * n for n in prepared.views_per_image]
    w, h = size
    assert prepared.views_per_image[0] == ref.get_number_of_image_patches(h, w, {"crop_to_patches": True})
    if max_patches >= 6 and size in SEVERAL_TILES:
        assert prepared.views_per_image[0] > 2  # a grid and its thumbnail


def test_max_tiles_option_matches_max_patches(make_internvl, make_test_image):
    """The processor's max tile count (what a --max-tiles flag sets) tiles as GotOcr2 with
    that max_patches does."""
    from vlmcli.errors import UsageError

    path = make_internvl()
    pipe = Pipeline.load(str(path), "cpu")
    image = make_test_image(size=(97, 41), seed=3)
    ref = transformers.GotOcr2ImageProcessor.from_pretrained(path)
    for n in (3, 1, 9):
        pipe.processor.set_max_tiles(n)
        prepared = pipe.prepare_images([image], Timings())
        expected = ref(images=[_pil(image)], crop_to_patches=True, max_patches=n, return_tensors="pt")
        assert torch.equal(prepared.pixels, expected["pixel_values"])
    with pytest.raises(UsageError):
        pipe.processor.set_max_tiles(0)


def test_no_preprocessor_config_uses_the_hub_recipe(make_internvl, make_test_image, tmp_path):
    """Without image settings: ImageNet statistics, the tower's tile size, 1 to 12 tiles."""
    import shutil

    path = tmp_path / "no-preprocessor"
    shutil.copytree(make_internvl(), path)
    (path / "preprocessor_config.json").unlink()
    notices = []
    pipe = Pipeline.load(str(path), "cpu", notice=notices.append)
    assert any("no preprocessor_config.json" in n for n in notices)
    assert pipe.processor.max_patches == 12
    image = make_test_image(size=(97, 41), seed=3)
    ref = transformers.GotOcr2ImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        crop_to_patches=True,
    )
    expected = ref(images=[_pil(image)], return_tensors="pt")["pixel_values"]
    assert torch.equal(pipe.prepare_images([image], Timings()).pixels, expected)


# ---- the whole model against transformers ---------------------------------------------------

VARIANTS = {
    # InternVL3's tower: layer norm, biases on q/k/v, no QK-norm; save_pretrained's names
    "layer-norm": dict(),
    # InternViT-6B's kind: RMS norm and QK-norm; the -hf repos' names; tied embeddings
    "qk-norm-rms-hub-tied": dict(
        vision_overrides=dict(use_qk_norm=True, norm_type="rms_norm", attention_bias=False),
        text_overrides=dict(tie_word_embeddings=True),
        key_layout="hub",
    ),
    # no mean pooling: transformers applies the tower's final layernorm to layer -1
    "final-layernorm": dict(vision_overrides=dict(use_mean_pooling=False)),
    # an inner feature layer, read from hidden_states
    "feature-layer-2": dict(config_overrides=dict(vision_feature_layer=-2)),
}


def check_parity(ref, processor, ours, images, prompt):
    """Compare every stage with transformers; returns (answer, measured differences)."""
    messages = [user_message(prompt, len(images))]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[_pil(p) for p in images], return_tensors="pt")

    prepared = ours.prepare_images(images, Timings())
    seq = ours.build_prompt(messages, prepared.token_counts)
    assert seq.ids == inputs["input_ids"][0].tolist()
    assert torch.equal(prepared.pixels, inputs["pixel_values"])

    measured = {}
    with torch.inference_mode():
        ref_feats = ref.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        ref_feats = list(torch.split(ref_feats.flatten(0, 1), prepared.token_counts))
        our_feats = list(ours.encode_prepared(prepared, Timings()))
        assert [f.shape for f in our_feats] == [f.shape for f in ref_feats]
        scale = max(f.abs().max().item() for f in ref_feats)
        diff = max((a - b).abs().max().item() for a, b in zip(our_feats, ref_feats))
        measured["features"] = diff / scale
        assert diff <= FEATURE_RTOL * scale

        ref_logits = ref(**inputs).logits
        cache = ours.model.new_cache(len(seq.ids))
        our_logits = ours.model(
            inputs["input_ids"], prepared.pixels, cache, last_only=False, views_per_image=prepared.views_per_image
        )
        scale = ref_logits.abs().max().item()
        diff = (our_logits - ref_logits).abs().max().item()
        measured["logits"] = diff / scale
        assert diff <= LOGIT_RTOL * scale

        ref_out = ref.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_tokens = ref_out[0, inputs["input_ids"].shape[1] :].tolist()
    answer = ours.ask(messages, images, SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0))
    assert answer.tokens == [t for t in ref_tokens if t not in ours.stop_ids]
    return answer, measured


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_internvl_matches_transformers(make_internvl, make_test_image, variant):
    path = make_internvl(**VARIANTS[variant])
    ref = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = reference_processor(path)
    ours = Pipeline.load(str(path), "cpu")
    # layer -2: the last block is never built, loaded or run
    unused_prefix = "vision_tower.encoder.layer.2." if variant == "feature-layer-2" else None
    assert all(unused_prefix and k.startswith(unused_prefix) for k in ours.loaded.unused_tensors)
    assert len(ours.loaded.unused_tensors) == (18 if unused_prefix else 0)
    one = make_test_image(size=ONE_TILE, seed=1)
    several = make_test_image(size=SEVERAL_TILES[0], seed=2)
    cases = [([one], PROMPTS[0]), ([one], PROMPTS[1]), ([several], PROMPTS[0]), ([several], PROMPTS[1])]
    if variant == "layer-norm":
        # two images of different tile counts in one prompt, and a portrait one
        cases += [([several, one], PROMPTS[0]), ([make_test_image(size=SEVERAL_TILES[1], seed=4)], PROMPTS[1])]
    worst = {"features": 0.0, "logits": 0.0}
    for images, prompt in cases:
        answer, measured = check_parity(ref, processor, ours, images, prompt)
        assert len(set(answer.tokens)) >= 8, answer.tokens
        assert answer.finish_reason == "length"
        worst = {k: max(worst[k], measured[k]) for k in worst}
    views = [ours.prepare_images([p], Timings()).views_per_image[0] for p in (one, several)]
    assert views[0] == 1 and views[1] > 2
    print(f"{variant}: {worst}")


def test_chat_session_with_tiled_images(make_internvl, make_test_image):
    """A conversation's images keep their own tile counts across turns."""
    from vlmcli.chat import ChatSession

    pipe = Pipeline.load(str(make_internvl()), "cpu")
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=6))
    session.add_image(make_test_image(size=(64, 48), seed=1))
    first = session.ask("What is in this picture?")
    assert first.tokens == pipe.ask(session.messages[:-1], session.images, session.opts).tokens
    session.add_image(make_test_image(size=ONE_TILE, seed=2))
    second = session.ask("And this one?")
    assert second.tokens == pipe.ask(session.messages[:-1], session.images, session.opts).tokens


# ---- config parsing -------------------------------------------------------------------------


def test_config_values_and_refusals():
    from vlmcli.errors import CheckpointError, UnsupportedModelError

    base = {"model_type": "internvl", "vision_config": {"model_type": "internvl_vision"}, "text_config": {"model_type": "qwen2"}}
    family, cfg = parse_config(base)
    assert family.name == "InternVL"
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.d_vision) == (448, 14, 1024)
    assert cfg.tokens_per_view() == 256 and cfg.max_visual_tokens() == 13 * 256
    assert cfg.projection.d_vision == 4096 and cfg.image_token_id == 151667
    assert cfg.text.tie_word_embeddings  # InternVLConfig's default
    assert cfg.image_tokens(448, 448) == 256  # a square image: one tile
    assert cfg.image_tokens(448, 896) == 3 * 256  # 2 x 1 grid and a thumbnail
    with pytest.raises(UnsupportedModelError, match="full"):
        parse_config({**base, "vision_feature_select_strategy": "full"})
    with pytest.raises(UnsupportedModelError, match="vision_feature_layer"):
        parse_config({**base, "vision_feature_layer": [-1, -2]})
    with pytest.raises(CheckpointError, match="downsample_ratio"):
        parse_config({**base, "downsample_ratio": 0})
    with pytest.raises(UnsupportedModelError, match="downsample_ratio"):
        parse_config({**base, "downsample_ratio": 0.4})
    with pytest.raises(CheckpointError, match="fold"):
        parse_config({**base, "vision_config": {"model_type": "internvl_vision", "image_size": 434}})
    with pytest.raises(UnsupportedModelError, match="norm_type"):
        parse_config({**base, "vision_config": {"model_type": "internvl_vision", "norm_type": "batch_norm"}})


# ---- the hub repos' tensor names at full size -------------------------------------------------

INTERNVIT_300M = {
    "architectures": ["InternVisionModel"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 1024,
    "image_size": [448, 448],
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-06,
    "layer_scale_init_value": 0.1,
    "model_type": "internvl_vision",
    "norm_type": "layer_norm",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": [14, 14],
    "projection_dropout": 0.0,
    "torch_dtype": "bfloat16",
    "use_absolute_position_embeddings": True,
    "use_mask_token": False,
    "use_mean_pooling": True,
    "use_qk_norm": False,
}


def _hub_config(text: dict, **top) -> dict:
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "model_type": "internvl",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "model_type": "qwen2",
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151674,
            **text,
        },
        "torch_dtype": "bfloat16",
        "vision_config": INTERNVIT_300M,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        **top,
    }


HUB_CONFIGS = {
    # Qwen2.5-0.5B-Instruct decoder, tied embeddings
    "OpenGVLab/InternVL3-1B-hf": _hub_config(
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, max_window_layers=21, tie_word_embeddings=True),
    ),
    # Qwen2.5-7B-Instruct decoder, its own lm_head
    "OpenGVLab/InternVL3-8B-hf": _hub_config(
        dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, max_window_layers=28, tie_word_embeddings=False),
        tie_word_embeddings=False,
    ),
}


def _hub_tensors(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(transformers.InternVLConfig.from_dict(cfg))
    # transformers 5's module names are the -hf repos' tensor names; state_dict keeps a tied
    # lm_head under its own name too
    return {k: (tuple(v.shape), "BF16") for k, v in model.state_dict().items()}


@pytest.mark.parametrize("repo", list(HUB_CONFIGS))
def test_hub_key_layout_loads(repo, monkeypatch, tmp_path):
    from backends.cpu import CpuBackend
    from vlmcli import loader
    from vlmcli.errors import CheckpointError

    cfg = HUB_CONFIGS[repo]
    tensors = _hub_tensors(cfg)
    names = set(tensors)
    for expected in (
        "model.vision_tower.embeddings.cls_token",
        "model.vision_tower.embeddings.position_embeddings",
        "model.vision_tower.embeddings.patch_embeddings.projection.weight",
        "model.vision_tower.encoder.layer.23.attention.q_proj.bias",
        "model.vision_tower.encoder.layer.0.attention.projection_layer.weight",
        "model.vision_tower.encoder.layer.0.lambda_1",
        "model.vision_tower.encoder.layer.0.layernorm_before.weight",
        "model.multi_modal_projector.layer_norm.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_2.bias",
        "model.language_model.layers.0.self_attn.q_proj.bias",
        "model.language_model.norm.weight",
        "lm_head.weight",
    ):
        assert expected in names
    assert tensors["model.multi_modal_projector.linear_1.weight"][0][1] == 4096
    assert tensors["model.vision_tower.embeddings.position_embeddings"][0] == (1, 1025, 1024)

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())
    tied = loaded.config.text.tie_word_embeddings
    assert tied == (repo == "OpenGVLab/InternVL3-1B-hf")
    assert set(loaded.unused_tensors) == ({"lm_head.weight"} if tied else set())
    # every parameter of ours came from one of the hub's tensors, with its shape
    family = family_for(cfg)
    ours = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    mapped = {family.weight_name(k): shape for k, (shape, _) in tensors.items()}
    for name in ours:
        if name.startswith(("vision.", "projector.")) or name in ("decoder.embed_tokens.weight", "decoder.norm.weight"):
            assert mapped[name] == ours[name], name

    missing = dict(tensors)
    missing.pop("model.vision_tower.encoder.layer.5.lambda_2")
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: missing)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        loader.load_model(tmp_path, CpuBackend())


def test_hub_configs_read_as_internvl():
    assert {repo: describe(cfg) for repo, cfg in HUB_CONFIGS.items()} == {
        repo: "InternVL (InternViT, MLP projector, Qwen2 decoder)" for repo in HUB_CONFIGS
    }
    one_b = parse_config(HUB_CONFIGS["OpenGVLab/InternVL3-1B-hf"])[1]
    assert one_b.tokens_per_view() == 256  # (448 / 14 / 2)^2
    assert one_b.vision_layers_needed() == 24
    assert one_b.text.sliding_window is None and one_b.text.rope.theta == 1e6
