"""The family table: what each model_type maps to, what is refused and how."""

from __future__ import annotations

import pytest

from vlmcli.config import MultiModalConfig
from vlmcli.errors import UnsupportedModelError
from vlmcli.families import (
    CHATML_CHAT_TEMPLATE,
    LLAVA_DEFAULT_CHAT_TEMPLATE,
    MISTRAL_CHAT_TEMPLATE,
    describe,
    family_for,
    supported_model_types,
)


def test_supported_model_types():
    assert supported_model_types() == ["llava", "llava_next", "llava_onevision"]
    assert [family_for({"model_type": t}).name for t in supported_model_types()] == [
        "LLaVA",
        "LLaVA-NeXT",
        "LLaVA-OneVision",
    ]


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as e:
        family_for({"model_type": "qwen2_vl"})
    assert str(e.value) == "config.json has 'qwen2_vl'; supported model types: llava, llava_next, llava_onevision"
    with pytest.raises(UnsupportedModelError, match="no model_type; supported model types: llava"):
        family_for({})


@pytest.mark.parametrize(
    "part, message",
    [
        ({"text_config": {"model_type": "phi3"}}, "decoder of model_type 'phi3' is not supported (supported: gemma, llama, mistral, qwen2)"),
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
    assert family.chat_template_for(parsed) == CHATML_CHAT_TEMPLATE
    mistral = MultiModalConfig.from_hf({"model_type": "llava_next", "text_config": {"model_type": "mistral"}})
    assert family_for({"model_type": "llava_next"}).chat_template_for(mistral) == MISTRAL_CHAT_TEMPLATE
    llama = MultiModalConfig.from_hf({"model_type": "llava"})
    assert family.chat_template_for(llama) == LLAVA_DEFAULT_CHAT_TEMPLATE


def test_vision_config_without_model_type_takes_the_familys_tower():
    # transformers' sub-config spec: a dict without model_type gets the config class's default
    ov = MultiModalConfig.from_hf({"model_type": "llava_onevision", "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "image_size": 384}})
    assert (ov.vision.model_type, ov.vision.patch_size) == ("siglip_vision_model", 16)
    llava = MultiModalConfig.from_hf({"model_type": "llava", "vision_config": {"hidden_size": 64, "num_attention_heads": 4}})
    assert (llava.vision.model_type, llava.vision.patch_size) == ("clip_vision_model", 32)
