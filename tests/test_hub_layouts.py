"""The key layouts of the real hub checkpoints this family covers load, at full size, without
downloading anything or allocating weights.

For each checkpoint, its config.json (below: the values transformers' conversion scripts
wrote, convert_llava_weights_to_hf.py / convert_llava_next_weights_to_hf.py /
convert_llava_onevision_weights_to_hf.py, with the decoders' own configs, in the sparse 4.4x
style of the llava-hf repos) is turned into transformers' model on the meta device; its
parameter names and shapes, renamed to the names llava-hf's safetensors use (the inverse of
transformers' conversion_mapping for llava / llava_next: `language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`,
top-level `image_newline`), are the checkpoint's headers. Our loader must then map every
tensor our model needs, with the right shape, and leave unused only what LLaVA never reads
(the vision tower's post_layernorm, CLIP's last block under layer -2, a tied lm_head).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import json  # noqa: E402

from vlmcli import loader  # noqa: E402
from vlmcli.errors import CheckpointError  # noqa: E402
from vlmcli.families import describe, family_for  # noqa: E402

from tests.family_checkpoints import HUB_NEXT_PINPOINTS as NEXT_PINPOINTS  # noqa: E402
from tests.family_checkpoints import HUB_ONEVISION_PINPOINTS as ONEVISION_PINPOINTS  # noqa: E402

SIGLIP_SO400M = {
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "layer_norm_eps": 1e-06,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 26,
    "patch_size": 14,
    "vision_use_head": False,
}
CLIP_L_336 = {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}

HUB_CONFIGS = {
    "llava-hf/llava-interleave-qwen-0.5b-hf": {
        "architectures": ["LlavaForConditionalGeneration"],
        "image_seq_length": 729,
        "image_token_index": 151646,
        "model_type": "llava",
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "Qwen/Qwen1.5-0.5B-Chat",
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "max_position_embeddings": 32768,
            "max_window_layers": 21,
            "model_type": "qwen2",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "num_key_value_heads": 16,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": 152000,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "vision_config": SIGLIP_SO400M,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    },
    "llava-hf/llava-v1.6-vicuna-7b-hf": {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "image_grid_pinpoints": NEXT_PINPOINTS,
        "image_token_index": 32000,
        "model_type": "llava_next",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "vision_config": CLIP_L_336,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    },
    "llava-hf/llava-v1.6-mistral-7b-hf": {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "image_grid_pinpoints": NEXT_PINPOINTS,
        "image_token_index": 32000,
        "model_type": "llava_next",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
            "architectures": ["MistralForCausalLM"],
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "model_type": "mistral",
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "torch_dtype": "bfloat16",
            "vocab_size": 32064,
        },
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "vision_config": CLIP_L_336,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    },
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "image_grid_pinpoints": ONEVISION_PINPOINTS,
        "image_token_index": 151646,
        "model_type": "llava_onevision",
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "Qwen/Qwen2-0.5B-Instruct",
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "max_position_embeddings": 32768,
            "max_window_layers": 24,
            "model_type": "qwen2",
            "num_attention_heads": 14,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "rope_theta": 1000000.0,
            "sliding_window": 131072,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": 152000,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "video_token_index": 151647,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": SIGLIP_SO400M,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    },
}

_CLASSES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
}


def _hub_name(key: str) -> str:
    """transformers 5's parameter name -> the name in llava-hf's safetensors."""
    for module_prefix, hub_prefix in (
        ("lm_head.", "language_model.lm_head."),
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if key.startswith(module_prefix):
            return hub_prefix + key[len(module_prefix) :]
    raise AssertionError(f"unexpected transformers parameter {key}")


def _hub_tensors(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[cfg["model_type"]])
    with torch.device("meta"):
        model = model_cls(config_cls.from_dict(cfg))
    # state_dict keeps tied weights under both names, as the hub files of these repos do
    return {_hub_name(k): (tuple(v.shape), "F16") for k, v in model.state_dict().items()}


@pytest.mark.parametrize("repo", list(HUB_CONFIGS))
def test_hub_key_layout_loads(repo, monkeypatch, tmp_path):
    """load_model on the checkpoint's headers: it refuses a checkpoint that lacks a tensor
    the config needs or has one of the wrong shape, before reading any data."""
    from backends.cpu import CpuBackend

    cfg = HUB_CONFIGS[repo]
    tensors = _hub_tensors(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # the headers above stand in for the safetensors files; no tensor data is read
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())

    parsed = loaded.config
    allowed_unused = {"vision_tower.vision_model.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.bias"}
    if parsed.text.tie_word_embeddings:
        allowed_unused.add("language_model.lm_head.weight")
    # CLIP-L: LLaVA reads layer -2, so the last block is never built or loaded
    last = parsed.vision.n_layers - 1
    if parsed.vision_layers_needed() <= last:
        allowed_unused |= {k for k in tensors if k.startswith(f"vision_tower.vision_model.encoder.layers.{last}.")}
    assert set(loaded.unused_tensors) == allowed_unused
    # and a checkpoint that lacks a needed tensor is refused
    missing = dict(tensors)
    missing.pop("image_newline" if parsed.anyres else "multi_modal_projector.linear_2.bias")
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: missing)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        loader.load_model(tmp_path, CpuBackend())


def test_hub_configs_read_as_their_families():
    described = {repo: describe(cfg) for repo, cfg in HUB_CONFIGS.items()}
    assert described == {
        "llava-hf/llava-interleave-qwen-0.5b-hf": "LLaVA (SigLIP, MLP projector, Qwen2 decoder)",
        "llava-hf/llava-v1.6-vicuna-7b-hf": "LLaVA-NeXT (CLIP ViT, MLP projector, Llama decoder)",
        "llava-hf/llava-v1.6-mistral-7b-hf": "LLaVA-NeXT (CLIP ViT, MLP projector, Mistral decoder)",
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "LLaVA-OneVision (SigLIP, MLP projector, Qwen2 decoder)",
    }
    interleave = family_for(HUB_CONFIGS["llava-hf/llava-interleave-qwen-0.5b-hf"]).parse(
        HUB_CONFIGS["llava-hf/llava-interleave-qwen-0.5b-hf"]
    )
    assert interleave.max_visual_tokens() == 729  # SigLIP so400m: 27 x 27 patches, "full"
    assert interleave.text.sliding_window is None  # use_sliding_window false
    mistral = family_for(HUB_CONFIGS["llava-hf/llava-v1.6-mistral-7b-hf"]).parse(
        HUB_CONFIGS["llava-hf/llava-v1.6-mistral-7b-hf"]
    )
    assert (mistral.text.sliding_window, mistral.text.rope.theta, mistral.text.norm_eps) == (None, 1e6, 1e-5)
    assert mistral.text.tie_word_embeddings is False
