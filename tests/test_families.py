"""The family table: what each model_type maps to, what is refused and how."""

from __future__ import annotations

import pytest

from vlmcli.config import MultiModalConfig
from vlmcli.errors import UnsupportedModelError
from vlmcli.families import describe, family_for, supported_model_types
from vlmcli.families.llava.templates import CHATML_CHAT_TEMPLATE, LLAVA_DEFAULT_CHAT_TEMPLATE, MISTRAL_CHAT_TEMPLATE


def test_supported_model_types():
    assert supported_model_types() == [
        "gemma", "gemma2", "internvl", "llama", "llava", "llava_next", "llava_onevision", "mistral", "mllama",
        "paligemma", "qwen", "qwen2", "qwen2_5_vl", "qwen2_vl",
    ]
    assert [family_for({"model_type": t}).name for t in supported_model_types()] == [
        "Language model",  # gemma, gemma2: a decoder alone (families/text: text-only GGUF and causal-LM folders)
        "Language model",
        "InternVL",
        "Language model",
        "LLaVA",
        "LLaVA-NeXT",
        "LLaVA-OneVision",
        "Language model",
        "Llama 3.2 Vision",
        "PaliGemma",
        "Qwen-VL",
        "Language model",
        "Qwen2.5-VL",
        "Qwen2-VL",
    ]


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as e:
        family_for({"model_type": "blip_2"})
    assert str(e.value) == (
        "config.json has 'blip_2'; supported model types: gemma, gemma2, internvl, llama, llava, llava_next, "
        "llava_onevision, mistral, mllama, paligemma, qwen, qwen2, qwen2_5_vl, qwen2_vl"
    )
    with pytest.raises(UnsupportedModelError, match="no model_type; supported model types: gemma, gemma2, internvl"):
        family_for({})


@pytest.mark.parametrize(
    "part, message",
    [
        ({"text_config": {"model_type": "phi3"}}, "decoder of model_type 'phi3' is not supported (supported: gemma, gemma2, llama, mistral, qwen2)"),
        ({"vision_config": {"model_type": "dinov2"}}, "vision tower of model_type 'dinov2' is not supported (supported: clip_vision_model, siglip_vision_model)"),
        ({"projector_type": "resampler"}, "projection type 'resampler' is not supported (supported: linear, mlp)"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls' is not supported"),
    ],
)
def test_unsupported_parts_are_named(part, message):
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MultiModalConfig.from_hf({"model_type": "llava", **part})


def test_onevision_needs_anyres_max_n():
    cfg = {"model_type": "llava_onevision", "vision_aspect_ratio": "anyres"}
    with pytest.raises(UnsupportedModelError, match="vision_aspect_ratio 'anyres' is not supported"):
        MultiModalConfig.from_hf(cfg)


def test_defaults_of_an_empty_config_are_transformers():
    # LlavaConfig / LlavaNextConfig / LlavaOnevisionConfig with no sub-configs
    llava = MultiModalConfig.from_hf({"model_type": "llava"})
    assert (llava.vision.model_type, llava.vision.image_size, llava.text.model_type) == ("clip_vision_model", 336, "llama")
    assert llava.max_visual_tokens() == 576
    nxt = MultiModalConfig.from_hf({"model_type": "llava_next"})
    assert nxt.anyres.grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    ov = MultiModalConfig.from_hf({"model_type": "llava_onevision"})
    assert (ov.vision.model_type, ov.vision.n_layers, ov.text.model_type, ov.anyres.max_tiles) == (
        "siglip_vision_model", 26, "qwen2", 9,
    )
    assert (ov.image_token_id, ov.vision_feature_select_strategy, ov.vision_feature_layers) == (151646, "full", (-1,))


def test_sparse_sub_configs_take_their_own_classes_defaults():
    # a SigLIP dict that leaves out what equals SiglipVisionConfig's defaults
    cfg = {"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}}
    vision = MultiModalConfig.from_hf(cfg).vision
    assert (vision.patch_size, vision.d_vision, vision.norm_eps, vision.activation) == (16, 768, 1e-6, "gelu_pytorch_tanh")
    # Mistral without sliding_window means 4096; Gemma without head_dim means 256
    mistral = MultiModalConfig.from_hf({"model_type": "llava", "text_config": {"model_type": "mistral"}}).text
    assert (mistral.sliding_window, mistral.n_kv_heads, mistral.max_position_embeddings) == (4096, 8, 131072)
    gemma = MultiModalConfig.from_hf({"model_type": "llava", "text_config": {"model_type": "gemma"}}).text
    assert (gemma.head_dim, gemma.activation, gemma.norm_offset, gemma.tie_word_embeddings) == (256, "gelu_pytorch_tanh", 1.0, True)
    assert gemma.embedding_multiplier == 3072**0.5


def test_describe_and_default_templates():
    cfg = {"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"},
           "text_config": {"model_type": "qwen2"}, "projector_type": "linear"}
    assert describe(cfg) == "LLaVA (SigLIP, linear projector, Qwen2 decoder)"
    parsed = MultiModalConfig.from_hf(cfg)
    family = family_for(cfg)
    assert family.chat_template(parsed) == CHATML_CHAT_TEMPLATE
    mistral = MultiModalConfig.from_hf({"model_type": "llava_next", "text_config": {"model_type": "mistral"}})
    assert family_for({"model_type": "llava_next"}).chat_template(mistral) == MISTRAL_CHAT_TEMPLATE
    llama = MultiModalConfig.from_hf({"model_type": "llava"})
    assert family.chat_template(llama) == LLAVA_DEFAULT_CHAT_TEMPLATE


def test_vision_config_without_model_type_takes_the_familys_tower():
    # transformers' sub-config spec: a dict without model_type gets the config class's default
    ov = MultiModalConfig.from_hf({"model_type": "llava_onevision", "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "image_size": 384}})
    assert (ov.vision.model_type, ov.vision.patch_size) == ("siglip_vision_model", 16)
    llava = MultiModalConfig.from_hf({"model_type": "llava", "vision_config": {"hidden_size": 64, "num_attention_heads": 4}})
    assert (llava.vision.model_type, llava.vision.patch_size) == ("clip_vision_model", 32)


# ---- whatever the new keys hold, only our own errors ----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_fuzz import apply_edits  # noqa: E402  (at import: hypothesis refuses @given run inside a test)
from vlmcli.errors import VlmError  # noqa: E402

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-2, 400), max_size=3),
    st.lists(st.lists(st.integers(-30, 400), max_size=3), max_size=4),
    st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings", "beta_fast", "attention_factor"]),
                    st.one_of(st.sampled_from(["linear", "dynamic", "yarn", "llama3", "default", "longrope"]),
                              st.floats(-2, 50), st.integers(-2, 9000)), max_size=5),
)
_PATHS = [
    ("model_type",), ("image_grid_pinpoints",), ("vision_aspect_ratio",), ("projector_type",),
    ("vision_config", "model_type"), ("vision_config", "image_size"), ("vision_config", "patch_size"),
    ("text_config", "model_type"), ("text_config", "rope_scaling"), ("text_config", "rope_parameters"),
    ("text_config", "sliding_window"), ("text_config", "use_sliding_window"), ("text_config", "layer_types"),
    ("text_config", "max_window_layers"), ("text_config", "head_dim"), ("text_config", "hidden_act"),
]
_BASE = {
    "model_type": "llava_onevision",
    "image_grid_pinpoints": [[30, 30], [30, 60], [60, 30]],
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 37,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 30, "patch_size": 6},
    "text_config": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                    "max_position_embeddings": 64},
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), _values), min_size=1, max_size=3))
def test_random_family_configs_raise_only_our_errors(edits):
    import copy

    import torch

    from vlmcli.model.multimodal import VisionLanguageModel

    cfg = copy.deepcopy(_BASE)
    apply_edits(cfg, edits)
    try:
        parsed = MultiModalConfig.from_hf(cfg)
        with torch.device("meta"):
            model = VisionLanguageModel(parsed)
        model.decoder.setup("cpu")
        model.decoder.rope(0, 8, torch.float32)
        model.decoder.rope(parsed.text.max_position_embeddings, 4, torch.float32)
        for h, w in ((30, 30), (17, 90), (200, 31)):
            assert parsed.image_tokens(h, w) >= 1
    except VlmError:
        pass


def test_sliding_window_layers_as_transformers_assigns_them():
    import transformers

    from vlmcli.config import text_from_hf

    base = {"model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 8,
            "max_window_layers": 2}
    pattern = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    for cfg in (base, {**base, "layer_types": pattern}, {**base, "max_window_layers": -1},
                {**base, "use_sliding_window": False}):
        ref = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
        expected = [ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types]
        assert [text_from_hf(cfg).window_for(i) for i in range(4)] == expected, cfg
    mistral = text_from_hf({"model_type": "mistral", "num_hidden_layers": 3, "sliding_window": 5})
    assert [mistral.window_for(i) for i in range(3)] == [5, 5, 5]
