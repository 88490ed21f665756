"""Builders for tiny random InternVL checkpoints (transformers' `internvl` layout), written by
transformers' save_pretrained with a processor, as OpenGVLab/InternVL3-*-hf are:

    config.json (InternVLConfig: InternVLVisionConfig + Qwen2Config), model.safetensors,
    tokenizer.json (the tiny ChatML tokenizer of tests/family_checkpoints.py plus <img>,
    </img>, <IMG_CONTEXT> and InternVL's other added tokens), tokenizer_config.json (with
    start/end/context image tokens as extra_special_tokens), chat_template.json (the -hf
    repos' template), preprocessor_config.json (GotOcr2ImageProcessor with ImageNet
    statistics) and processor_config.json (InternVLProcessor, image_seq_length).

Tiny sizes: 32 px tiles in 4 px patches (8 x 8 patches, pixel-shuffled to 16 tokens a tile),
vision hidden 32 with 3 layers; decoder hidden 64, 2 layers. max_patches 6 by default, so a
landscape image gets several tiles and a thumbnail, a small square one a single tile.

key_layout: "saved" (what save_pretrained writes: `language_model.model.*`, `vision_tower.*`,
`multi_modal_projector.*`, `language_model.lm_head`) or "hub" (the -hf repos' and
transformers 5's in-memory names: `model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `lm_head`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import (
    DEFAULT_WEIGHT_SCALE,
    _rename_safetensors_keys,
    _transformers_version,
    _write_json,
    randomize_weights_,
)
from tests.family_checkpoints import _chatml_tokenizer_config, tiny_text_config, train_chatml_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# transformers' convert_internvl_weights_to_hf.py chat_template (what the -hf repos carry)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)

INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def train_internvl_tokenizer():
    from tokenizers import AddedToken

    tok = train_chatml_tokenizer()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in INTERNVL_SPECIALS])
    return tok


def _tokenizer_config() -> dict:
    cfg = _chatml_tokenizer_config()
    cfg["extra_special_tokens"] = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    cfg["model_max_length"] = 8192
    return cfg


def tiny_internvl_vision_config(image_size: int = 32, patch_size: int = 4, **overrides):
    from transformers import InternVLVisionConfig

    values = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        norm_type="layer_norm",
        use_qk_norm=False,
        attention_bias=True,  # InternVL3's qkv_bias
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,
    )
    return InternVLVisionConfig(**{**values, **overrides})


def gotocr2_preprocessor_config(tile: int, *, min_patches: int = 1, max_patches: int = 6) -> dict:
    # what GotOcr2ImageProcessor(...).save_pretrained writes for the -hf repos, with our tile
    return {
        "crop_to_patches": False,  # as saved; InternVLProcessor turns it on when it calls it
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_processor_type": "GotOcr2ImageProcessor",
        "image_std": list(IMAGENET_STD),
        "max_patches": max_patches,
        "min_patches": min_patches,
        "processor_class": "InternVLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": tile, "width": tile},
    }


def _to_hub_layout(key: str) -> str:
    """save_pretrained's names -> the -hf repos' (transformers 5's in-memory) names."""
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    if key.startswith("language_model."):
        return "model." + key
    if key.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + key
    return key


def make_internvl_checkpoint(
    path,
    *,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
    config_overrides: dict | None = None,
    image_size: int = 32,
    patch_size: int = 4,
    min_patches: int = 1,
    max_patches: int = 6,
    key_layout: str = "saved",
    seed: int = 0,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random InternVL checkpoint to `path` and return `path`."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_internvl_tokenizer()
    bos, eos, pad = None, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    context_id = tok.token_to_id("<IMG_CONTEXT>")

    vision_config = tiny_internvl_vision_config(image_size, patch_size, **(vision_overrides or {}))
    text_overrides = dict(text_overrides or {})
    text_overrides.setdefault("tie_word_embeddings", False)
    text_config = tiny_text_config("qwen2", tok.get_vocab_size(), bos, eos, pad, **text_overrides)
    per_tile = ((image_size // patch_size) // 2) ** 2
    values = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=context_id,
        image_seq_length=per_tile,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    values.update(config_overrides or {})
    config = InternVLConfig(**values)

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    randomize_weights_(model, weight_scale, seed)
    with torch.no_grad():  # layer scale well away from 1 and of both signs, as trained ones are
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.vision_tower.encoder.layer:
            for p in (layer.lambda_1, layer.lambda_2):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.to(dtype).save_pretrained(path)
    if key_layout == "hub":
        _rename_safetensors_keys(path, _to_hub_layout)
    elif key_layout != "saved":
        raise ValueError(f"unknown key_layout {key_layout!r}")

    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", _tokenizer_config())
    _write_json(path / "chat_template.json", {"chat_template": INTERNVL_TEMPLATE})
    _write_json(
        path / "preprocessor_config.json",
        gotocr2_preprocessor_config(image_size, min_patches=min_patches, max_patches=max_patches),
    )
    _write_json(path / "processor_config.json", {"image_seq_length": per_tile, "processor_class": "InternVLProcessor"})
    _write_json(
        path / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "transformers_version": _transformers_version()},
    )
    return path


def reference_processor(path):
    """transformers' InternVLProcessor for a checkpoint from make_internvl_checkpoint, without
    the video processor (InternVLVideoProcessor needs torchvision)."""
    import transformers

    class _ImageOnly(transformers.InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    path = Path(path)
    extra = json.loads((path / "processor_config.json").read_text())
    return _ImageOnly(
        image_processor=transformers.GotOcr2ImageProcessor.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path),
        video_processor=None,
        chat_template=json.loads((path / "chat_template.json").read_text())["chat_template"],
        image_seq_length=extra["image_seq_length"],
    )
