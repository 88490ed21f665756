"""Builders for tiny random checkpoints of the LLaVA family beyond 1.5, written by transformers.

As in tests/checkpoints.py (whose tokenizer, weight randomisation and key-renaming helpers
this reuses), every file is the real Hugging Face layout, so our loader sees what a user
downloads:

    model_type        vision          decoder                           tokenizer
    llava             SigLIP or CLIP  Llama, Qwen2, Mistral or Gemma    ChatML (byte-level BPE) or Llama
    llava_next        CLIP or SigLIP  (any of the four)                 Llama or ChatML
    llava_onevision   SigLIP          (any of the four)                 ChatML

`make_family_checkpoint` writes config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.json, preprocessor_config.json (SiglipImageProcessor,
CLIPImageProcessor, LlavaNextImageProcessor or LlavaOnevisionImageProcessor) and
processor_config.json, with the names and values of the llava-hf repos they imitate:

    llava-hf/llava-interleave-qwen-0.5b-hf   make_family_checkpoint(model_type="llava")  (the defaults)
    llava-hf/llava-v1.6-vicuna-7b-hf         model_type="llava_next", vision="clip", text="llama", tokenizer="llama"
    llava-hf/llava-v1.6-mistral-7b-hf        ... text="mistral", chat_template=MISTRAL_TEMPLATE
    llava-hf/llava-onevision-qwen2-0.5b-ov-hf  model_type="llava_onevision"

Tiny sizes: vision hidden 32, 3 layers, 30 px images in 6 px patches (25 patches); decoder
hidden 64, 2 layers. Anyres grids are the real ones scaled from 336 px (NeXT) or 384 px
(OneVision) tiles down to 30 px tiles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import (
    CLIP_MEAN,
    CLIP_STD,
    CORPUS,
    DEFAULT_WEIGHT_SCALE,
    LLAVA_TEMPLATE,
    _legacy_config,
    _llama_tokenizer_config,
    _rename_safetensors_keys,
    _transformers_version,
    _write_json,
    randomize_weights_,
    tiny_clip_vision_config,
    train_tokenizer,
)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# llava-hf/llava-interleave-qwen-0.5b-hf's chat template in shape: ChatML, each turn's images
# first as "<image>\n", then its text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}"
    "{% endfor %}"
    "{{'<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf's format: "[INST] <image>\nquestion [/INST]".
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + content['text'] + '</s>' }}{% endfor %}"
    "{% endif %}{% endfor %}"
)

# The grids of the llava-hf repos: LlavaNextConfig's default for 336 px tiles, and
# LlavaOnevisionConfig's (384 .. 2304 px, 1 to 6 tiles a side).
HUB_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
HUB_ONEVISION_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
# The NeXT grid scaled to 30 px tiles.
NEXT_PINPOINTS = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]
# LlavaOnevisionConfig's default grid (384 .. 2304 px, 1 to 6 tiles a side), scaled to 30 px
# tiles and cut to 1-3 tiles a side to keep the tests fast.
ONEVISION_PINPOINTS = [[h, w] for h in (30, 60, 90) for w in (30, 60, 90)]

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def train_chatml_tokenizer(vocab_size: int = 600):
    """A small byte-level BPE tokenizer shaped like the one transformers 5's Qwen2Tokenizer
    builds (NFC, Qwen's split regex, ByteLevel without prefix space), trained on CORPUS, with
    <|endoftext|> (id 0), <|im_start|>, <|im_end|>, <image> and <video> as special tokens at
    the end. Deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHATML_SPECIALS) + 1,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CHATML_SPECIALS])
    assert tok.token_to_id("<|endoftext|>") == 0
    return tok


def _chatml_tokenizer_config() -> dict:
    # what llava-interleave-qwen / llava-onevision-qwen2 ship, trimmed
    return {
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 32768,
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
    }


def tiny_siglip_vision_config(image_size: int = 30, patch_size: int = 6, num_hidden_layers: int = 3, **overrides):
    from transformers import SiglipVisionConfig

    values = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,  # llava-interleave / onevision towers have no pooling head
    )
    return SiglipVisionConfig(**{**values, **overrides})


def tiny_text_config(kind: str, vocab_size: int, bos: int | None, eos: int, pad: int, **overrides):
    """A tiny decoder config of `kind` (llama, qwen2, mistral, gemma)."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        cls = LlamaConfig
    elif kind == "qwen2":
        cls = Qwen2Config
        common.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif kind == "mistral":
        cls = MistralConfig
        common.update(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif kind == "gemma":
        cls = GemmaConfig
        # head_dim set apart from hidden / heads (as Gemma's 256 is), multi-query attention
        common.update(num_key_value_heads=1, head_dim=24, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown decoder kind {kind!r}")
    common.update(overrides)
    return cls(**common)


def _siglip_preprocessor_config(image_size: int) -> dict:
    # llava-interleave-qwen-0.5b-hf's preprocessor_config.json with our image size
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(SIGLIP_MEAN),
        "image_processor_type": "SiglipImageProcessor",
        "image_std": list(SIGLIP_STD),
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def _next_preprocessor_config(image_size: int, pinpoints, vision: str) -> dict:
    # llava-v1.6-*-hf's preprocessor_config.json (LlavaNextImageProcessor) with our sizes
    mean, std = (CLIP_MEAN, CLIP_STD) if vision == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    return {
        "aspect_ratio_setting": "anyres",
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_grid_pinpoints": pinpoints,
        "image_mean": list(mean),
        "image_processor_type": "LlavaNextImageProcessor",
        "image_std": list(std),
        "processor_class": "LlavaNextProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def _onevision_preprocessor_config(image_size: int, pinpoints) -> dict:
    # llava-onevision-qwen2-0.5b-ov-hf's preprocessor_config.json with our sizes
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_grid_pinpoints": pinpoints,
        "image_mean": list(SIGLIP_MEAN),
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_std": list(SIGLIP_STD),
        "processor_class": "LlavaOnevisionProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def _to_module_layout(key: str) -> str:
    """save_pretrained's names -> transformers 5's in-memory names (model.* prefixes)."""
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    if key.startswith(("vision_tower.", "multi_modal_projector.")) or key == "image_newline":
        return "model." + key
    return key


def _to_hub_layout(key: str) -> str:
    """save_pretrained's names -> llava-hf's hub names (the vision tower under vision_model.)."""
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def make_family_checkpoint(
    path,
    *,
    model_type: str = "llava",
    vision: str = "siglip",
    text: str = "qwen2",
    tokenizer: str | None = None,
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    config_overrides: dict | None = None,
    strategy: str | None = None,
    feature_layer: int | list[int] | None = None,
    pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    key_layout: str = "saved",
    legacy_config: bool = False,
    config_json_overrides: dict | None = None,
    chat_template: str | None = None,
    image_size: int = 30,
    patch_size: int = 6,
    seed: int = 0,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random checkpoint of `model_type` to `path` and return `path`.

    vision: "siglip" or "clip"; text: "llama", "qwen2", "mistral" or "gemma";
    tokenizer: "chatml" or "llama" (default: chatml for a Qwen2 decoder, else llama).
    strategy / feature_layer: vision_feature_select_strategy / vision_feature_layer
    (default: full / -1 for SigLIP, as llava-interleave and OneVision; default / -2 for CLIP).
    text_overrides go to the decoder config (rope_parameters, sliding_window, ...),
    vision_overrides to the SigLIP config (sizes), config_overrides to the top-level config. key_layout: "saved" (what save_pretrained
    writes), "hub" (llava-hf's names) or "module" (transformers 5's in-memory names).
    legacy_config: rewrite config.json sparsely, as the 4.4x-era llava-hf repos carry it
    (sub-configs keep only what differs from their class's defaults; no layer_types).
    config_json_overrides: merged into the written config.json afterwards (a dict value for
    text_config / vision_config merges into it), for values transformers would normalise
    away when building the config (e.g. Gemma's legacy hidden_act "gelu").
    dtype: what the weights are saved as.
    """
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or ("chatml" if text == "qwen2" else "llama")
    if tokenizer == "chatml":
        tok = train_chatml_tokenizer()
        bos, eos, pad = None, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
        tok_config = _chatml_tokenizer_config()
        template = CHATML_TEMPLATE
    else:
        tok = train_tokenizer(512)
        bos, eos, pad = (tok.token_to_id(t) for t in ("<s>", "</s>", "<unk>"))
        tok_config = _llama_tokenizer_config()
        template = LLAVA_TEMPLATE
    template = chat_template or template
    image_token_id = tok.token_to_id("<image>")

    if vision == "siglip":
        vision_config = tiny_siglip_vision_config(image_size, patch_size, **(vision_overrides or {}))
        strategy = strategy or "full"
        feature_layer = -1 if feature_layer is None else feature_layer
        extra_tokens = 0
    else:
        vision_config = tiny_clip_vision_config(image_size, patch_size)
        strategy = strategy or "default"
        feature_layer = -2 if feature_layer is None else feature_layer
        extra_tokens = 1
    text_overrides = dict(text_overrides or {})
    vocab_size = text_overrides.pop("vocab_size", tok.get_vocab_size())
    text_config = tiny_text_config(text, vocab_size, bos, eos, pad, **text_overrides)
    n_patches = (image_size // patch_size) ** 2
    tokens_per_view = n_patches + extra_tokens - (1 if strategy == "default" else 0)

    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    common.update(config_overrides or {})
    if model_type == "llava":
        config = LlavaConfig(image_seq_length=tokens_per_view, **common)
        model_cls = LlavaForConditionalGeneration
    elif model_type == "llava_next":
        pinpoints = pinpoints or NEXT_PINPOINTS
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, image_seq_length=tokens_per_view, **common)
        model_cls = LlavaNextForConditionalGeneration
    elif model_type == "llava_onevision":
        pinpoints = pinpoints or ONEVISION_PINPOINTS
        config = LlavaOnevisionConfig(
            image_grid_pinpoints=pinpoints,
            vision_aspect_ratio=vision_aspect_ratio,
            video_token_id=tok.token_to_id("<video>"),
            **common,
        )
        model_cls = LlavaOnevisionForConditionalGeneration
    else:
        raise ValueError(f"unknown model_type {model_type!r}")

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_weights_(model, weight_scale, seed)
    if getattr(model.model, "image_newline", None) is not None:
        with torch.no_grad():  # a vector like a word embedding, not a norm scale around 1
            gen = torch.Generator().manual_seed(seed + 1)
            model.model.image_newline.copy_(torch.randn(model.model.image_newline.shape, generator=gen))
    model.to(dtype).save_pretrained(path)
    if key_layout == "hub":
        _rename_safetensors_keys(path, _to_hub_layout)
    elif key_layout == "module":
        _rename_safetensors_keys(path, _to_module_layout)
    elif key_layout != "saved":
        raise ValueError(f"unknown key_layout {key_layout!r}")
    if legacy_config or config_json_overrides:
        written = json.loads((path / "config.json").read_text())
        if legacy_config:
            written = _legacy_config(written, type(text_config)().to_dict(), type(vision_config)().to_dict())
            written["text_config"].pop("layer_types", None)
        for key, value in (config_json_overrides or {}).items():
            if isinstance(value, dict) and isinstance(written.get(key), dict):
                written[key] = {**written[key], **value}
            else:
                written[key] = value
        _write_json(path / "config.json", written)

    tok.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", tok_config)
    _write_json(path / "chat_template.json", {"chat_template": template})
    if model_type == "llava":
        processor = {
            "image_token": "<image>",
            "num_additional_image_tokens": extra_tokens,
            "patch_size": patch_size,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": strategy,
        }
        preprocessor = (
            _siglip_preprocessor_config(image_size)
            if vision == "siglip"
            else _clip_like(image_size)
        )
    elif model_type == "llava_next":
        processor = {
            "image_token": "<image>",
            "num_additional_image_tokens": extra_tokens,
            "patch_size": patch_size,
            "processor_class": "LlavaNextProcessor",
            "vision_feature_select_strategy": strategy,
        }
        preprocessor = _next_preprocessor_config(image_size, pinpoints, vision)
    else:
        processor = {
            "image_token": "<image>",
            "num_image_tokens": n_patches + extra_tokens,
            "processor_class": "LlavaOnevisionProcessor",
            "video_token": "<video>",
            "vision_aspect_ratio": vision_aspect_ratio,
            "vision_feature_select_strategy": strategy,
        }
        preprocessor = _onevision_preprocessor_config(image_size, pinpoints)
    _write_json(path / "processor_config.json", processor)
    _write_json(path / "preprocessor_config.json", preprocessor)
    _write_json(
        path / "generation_config.json",
        {
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "transformers_version": _transformers_version(),
        },
    )
    return path


def _clip_like(image_size: int) -> dict:
    from tests.checkpoints import _clip_preprocessor_config

    return _clip_preprocessor_config(image_size)


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


DEFAULT_SIZE_CACHE_NAME = "default-size-llava-v1"  # bump when the build changes


def default_size_checkpoint(cache_root=None) -> Path:
    """Build (once) and return a random LLaVA the size and kind of the CLI's default model,
    llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP-so400m at 384 px in 14 px patches (26
    layers of its 27, as the hub config keeps; width 1152; 729 image tokens), a 2-layer GELU
    projector, and a Qwen2-0.5B decoder (24 layers, width 896, 14 heads / 2 KV heads,
    vocabulary 151936, tied embeddings), saved in float16 as the hub repo is. 0.89 B parameters, 1.8 GB on disk. Weights ~ N(0, 0.02)
    (transformers' initializer range), the tokenizer the tiny ChatML one: ids past its 600
    tokens decode to nothing, which is fine for a speed benchmark that compares token ids.

    For benchmarks (speed, memory); cached like smollm2_llava_checkpoint.
    """
    from tests.checkpoints import _default_cache_root, build_cached

    final = (Path(cache_root) if cache_root is not None else _default_cache_root()) / DEFAULT_SIZE_CACHE_NAME
    return build_cached(final, _build_default_size)


def _build_default_size(folder: Path) -> None:
    make_family_checkpoint(
        folder,
        model_type="llava",
        image_size=384,
        patch_size=14,
        vision_overrides=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
        text_overrides=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
        weight_scale=0.02,
        dtype=torch.float16,
    )
