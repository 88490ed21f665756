"""Qwen-VL / Qwen-VL-Chat against references derived in this file.

transformers has no Qwen-VL class and the published modeling code is never run, so each
component is checked against an independent computation over the published tensors:
the tokenizer against tiktoken itself, the resampler's positions against the sin-cos
formula, the resampler against nn.MultiheadAttention, the ViT against torch primitives
(visual.py's per-head packed in_proj written out), the decoder against transformers' Qwen2
(the same math: biases on q/k/v only, c_attn split into thirds, w2 the SiLU gate), and the
whole model's logits against the composition of those references. The full-size key layout
of Qwen-VL-Chat is loaded on `meta`.
"""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.qwen_vl_checkpoints import (
    CORPUS, PAT_STR, SPECIALS, published_tensors, sincos_reference, train_ranks, write_qwen_vl,
)
from vlmcli.families.qwen_vl.tokenizer import vocabulary

# Chat-format ids for the prompts below; shared fixtures write each checkpoint once.
STRINGS = [
    "Hello world, it's a test. We're sure they've I'm",
    "这是一只猫。图片里有什么？请描述这张图片。",
    "日本語のテキスト、한국어 텍스트",
    "emoji 😀🐱🚀👩‍👩‍👧 and flags 🇫🇷",
    "def main():\n    return [x * 2 for x in range(10)]\n\n\nclass Foo:\n\tpass\n",
    "   leading, trailing   \n\n  \t\t  \r\n\r\n   ",
    "numbers 1234567890 3.14159 and symbols !@#$%^&*()_+-=[]{};':\",./<>?",
    "Cafe\u0301 vs Café (NFC folds the combining accent)",
    "<|im_start|>user\nhi<|im_end|> <img>x</img><imgpad><|extra_7|>",
    CORPUS,
    "",
]


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory):
    return write_qwen_vl(tmp_path_factory.mktemp("qwen_vl") / "Qwen-VL-Chat-tiny")


@pytest.fixture(scope="module")
def qwen_vl_base(tmp_path_factory):
    return write_qwen_vl(tmp_path_factory.mktemp("qwen_vl") / "Qwen-VL-tiny", chat=False)


@pytest.fixture(scope="module")
def tensors(qwen_vl):
    from safetensors.torch import load_file

    return load_file(str(qwen_vl / "model.safetensors"))


@pytest.fixture(scope="module")
def loaded(qwen_vl):
    from backends.cpu import CpuBackend
    from vlmcli.loader import load_model

    return load_model(qwen_vl, CpuBackend())


def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    ranks = train_ranks()
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIALS)}
    return tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


# ---- tokenizer


def test_tokenizer_matches_tiktoken(qwen_vl):
    import unicodedata

    from vlmcli.tokenizer import Tokenizer  # with the family's vocabulary, as the pipeline loads it

    enc = tiktoken_encoding()
    tok = Tokenizer.from_dir(qwen_vl, vocabulary=vocabulary(qwen_vl))
    n = len(train_ranks())
    # ids in tokenization_qwen.py's order: ranks, then the specials
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(n, n + len(SPECIALS)))
    assert (tok.token_to_id("<img>"), tok.token_to_id("<imgpad>")) == (n + 214, n + 216)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", n + 2)
    for s in STRINGS:
        # QWenTokenizer.tokenize: NFC, then tiktoken with the special tokens allowed
        expected = enc.encode(unicodedata.normalize("NFC", s), allowed_special="all")
        assert tok.encode(s) == expected, s
        assert tok.decode(expected, skip_special_tokens=False) == enc.decode(expected)
    # skip_special_tokens drops ids >= <|endoftext|>, as the published _decode does
    ids = enc.encode("a<|im_end|>b<img>", allowed_special="all")
    assert tok.decode(ids) == "ab"


def test_tokenizer_refuses_a_bad_vocabulary(tmp_path):
    from vlmcli.errors import CheckpointError
    from vlmcli.families.qwen_vl.tokenizer import backend_from_tiktoken

    (tmp_path / "qwen.tiktoken").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(CheckpointError, match="ranks are not"):
        backend_from_tiktoken(tmp_path / "qwen.tiktoken")
    (tmp_path / "qwen.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(CheckpointError, match="line 1"):
        backend_from_tiktoken(tmp_path / "qwen.tiktoken")


# ---- vision


def test_resampler_positions_are_the_sincos_formula():
    from vlmcli.families.qwen_vl.vision import sincos_2d

    for dim, side in ((128, 4), (4096, 16)):
        ours = sincos_2d(dim, side)
        ref = sincos_reference(dim, side)
        assert ours.shape == (side * side, dim)
        # visual.py computes the angles in float32 numpy: the float64 formula differs by rounding
        assert (ours.double() - ref).abs().max().item() < 2e-5 * side


def interpolate_reference(pos: torch.Tensor, n: int) -> torch.Tensor:
    src, dst = math.isqrt(pos.shape[0]), math.isqrt(n)
    grid = pos.reshape(src, src, -1).permute(2, 0, 1)[None]
    return F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(n, -1)


def vit_reference(t: dict, pixels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """visual.py's VisionTransformer up to the resampler, over the published tensors."""
    v = cfg["visual"]
    p = "transformer.visual."
    x = F.conv2d(pixels, t[p + "conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = x + interpolate_reference(t[p + "positional_embedding"], x.shape[1])
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], 1e-6)  # noqa: E731
    x = ln(x, p + "ln_pre")
    H, hd = v["heads"], v["width"] // v["heads"]
    for i in range(v["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        h = ln(x, b + "ln_1")
        mixed = F.linear(h, t[b + "attn.in_proj.weight"], t[b + "attn.in_proj.bias"])
        mixed = mixed.view(*h.shape[:2], H, 3 * hd)  # [q_h | k_h | v_h] per head
        q, k, val = mixed[..., :hd], mixed[..., hd : 2 * hd], mixed[..., 2 * hd :]
        scores = torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(hd), k).softmax(-1)
        a = torch.einsum("bhqk,bkhd->bqhd", scores, val).reshape(h.shape)
        x = x + F.linear(a, t[b + "attn.out_proj.weight"], t[b + "attn.out_proj.bias"])
        h = ln(x, b + "ln_2")
        h = torch.nn.GELU()(F.linear(h, t[b + "mlp.c_fc.weight"], t[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, t[b + "mlp.c_proj.weight"], t[b + "mlp.c_proj.bias"])
    return x


def resampler_reference(t: dict, x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """softmax((q + pos_q)(k + pos_k)^T / sqrt(d)) v through nn.MultiheadAttention, then
    ln_post and @ proj."""
    p = "transformer.visual."
    a = p + "attn_pool."
    out = cfg["visual"]["output_dim"]
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], t[name + ".weight"], t[name + ".bias"], 1e-6)  # noqa: E731
    mha = torch.nn.MultiheadAttention(out, out // 128, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(t[a + "attn.in_proj_weight"])
        mha.in_proj_bias.copy_(t[a + "attn.in_proj_bias"])
        mha.out_proj.weight.copy_(t[a + "attn.out_proj.weight"])
        mha.out_proj.bias.copy_(t[a + "attn.out_proj.bias"])
    kv = ln(F.linear(x, t[a + "kv_proj.weight"]), a + "ln_kv")
    pos = t[a + "pos_embed"]
    q = (ln(t[a + "query"], a + "ln_q") + pos).expand(x.shape[0], -1, -1)
    y = mha(q, kv + interpolate_reference(pos, x.shape[1]), kv, need_weights=False)[0]
    return ln(y, p + "ln_post") @ t[p + "proj"]


def test_vision_tower_and_resampler_match_the_references(loaded, tensors, qwen_vl):
    cfg = json.loads((qwen_vl / "config.json").read_text())
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 84, 84)
    model = loaded.model
    with torch.no_grad():
        feats = model.vision(pixels)
        ref_feats = vit_reference(tensors, pixels, cfg)
        scale = ref_feats.abs().max().item()
        assert (feats - ref_feats).abs().max().item() < 1e-5 * scale
        tokens = model.projector(ref_feats)
        ref_tokens = resampler_reference(tensors, ref_feats, cfg)
    assert tokens.shape == (2, 16, 128)
    assert (tokens - ref_tokens).abs().max().item() < 1e-5 * ref_tokens.abs().max().item()
    # different images, different tokens (the weights are not degenerate)
    assert (ref_tokens[0] - ref_tokens[1]).abs().max().item() > 0.1


def test_preprocessing_is_the_published_transform(qwen_vl, loaded, make_test_image):
    """Resize((448, 448), BICUBIC) on the Pillow image, ToTensor, Normalize(CLIP)."""
    from vlmcli.families.qwen_vl.processor import QwenVLProcessor
    from vlmcli.tokenizer import Tokenizer

    processor = QwenVLProcessor(loaded.config, qwen_vl, Tokenizer.from_dir(qwen_vl, vocabulary=vocabulary(qwen_vl)))
    image = Image.open(make_test_image(size=(64, 48), seed=3)).convert("RGB")
    prepared = processor.prepare_images([image])
    resized = image.resize((84, 84), resample=Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    ref = (x - mean) / std
    assert prepared.pixels.shape == (1, 3, 84, 84)
    assert (prepared.pixels[0] - ref).abs().max().item() < 1e-6
    assert prepared.token_counts == [16]


# ---- decoder


def qwen2_reference(t: dict, cfg: dict):
    """transformers' Qwen2 with the QWen weights: c_attn's rows are q, k, v in turn; w2 is
    the SiLU gate (QWenMLP: w1(x) * silu(w2(x)))."""
    transformers = pytest.importorskip("transformers")
    d = cfg["hidden_size"]
    config = transformers.Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=d, intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], rms_norm_eps=cfg["layer_norm_epsilon"],
        rope_theta=float(cfg["rotary_emb_base"]), max_position_embeddings=cfg["seq_length"],
        tie_word_embeddings=False, attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    sd = {"model.embed_tokens.weight": t["transformer.wte.weight"], "model.norm.weight": t["transformer.ln_f.weight"],
          "lm_head.weight": t["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        h, m = f"transformer.h.{i}.", f"model.layers.{i}."
        for part, w, b in zip("qkv", t[h + "attn.c_attn.weight"].chunk(3), t[h + "attn.c_attn.bias"].chunk(3)):
            sd[m + f"self_attn.{part}_proj.weight"], sd[m + f"self_attn.{part}_proj.bias"] = w, b
        sd |= {m + "self_attn.o_proj.weight": t[h + "attn.c_proj.weight"], m + "input_layernorm.weight": t[h + "ln_1.weight"],
               m + "post_attention_layernorm.weight": t[h + "ln_2.weight"], m + "mlp.gate_proj.weight": t[h + "mlp.w2.weight"],
               m + "mlp.up_proj.weight": t[h + "mlp.w1.weight"], m + "mlp.down_proj.weight": t[h + "mlp.c_proj.weight"]}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return model


def test_decoder_matches_qwen2_with_the_same_weights(loaded, tensors, qwen_vl):
    cfg = json.loads((qwen_vl / "config.json").read_text())
    ref = qwen2_reference(tensors, cfg)
    torch.manual_seed(1)
    ids = torch.randint(0, 700, (1, 40))
    model = loaded.model
    with torch.no_grad():
        expected = ref(ids).logits[0]
        cache = model.new_cache(64)
        ours = model.decoder(model.decoder.embed_tokens(ids), 0, cache, last_only=False)[0]
        # and token by token through the cache
        cache = model.new_cache(64)
        model.prefill(ids[:, :30], None, cache)
        steps = torch.stack([model.step(ids[:, i : i + 1], i, cache)[0] for i in range(30, 40)])
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() < 1e-5 * scale
    assert (steps - expected[30:]).abs().max().item() < 1e-5 * scale


def test_whole_model_logits_match_the_composed_reference(loaded, tensors, qwen_vl, make_test_image):
    """Visual tokens in the 16 <imgpad> slots of the chat prompt, against the references
    chained: ViT -> resampler -> Qwen2 over inputs_embeds."""
    from vlmcli.families.qwen_vl.processor import QwenVLProcessor
    from vlmcli.tokenizer import Tokenizer

    cfg = json.loads((qwen_vl / "config.json").read_text())
    processor = QwenVLProcessor(loaded.config, qwen_vl, Tokenizer.from_dir(qwen_vl, vocabulary=vocabulary(qwen_vl)))
    image = Image.open(make_test_image(size=(64, 48), seed=4))
    prepared = processor.prepare_images([image])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.build_prompt(messages, prepared.token_counts, 2048)
    ids = torch.tensor([prompt.ids])
    ref = qwen2_reference(tensors, cfg)
    with torch.no_grad():
        visual = resampler_reference(tensors, vit_reference(tensors, prepared.pixels, cfg), cfg)
        embeds = ref.model.embed_tokens(ids.masked_fill(ids == loaded.config.image_token_id, 0))
        embeds[ids == loaded.config.image_token_id] = visual.reshape(-1, visual.shape[-1])
        expected = ref(inputs_embeds=embeds).logits[0, -1]
        ours = loaded.model.prefill(ids, loaded.model.encode(prepared), loaded.model.new_cache(ids.shape[1] + 1))[0]
    assert (ours - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


# ---- prompts


def test_chat_prompt_is_make_context(qwen_vl):
    """make_context's ChatML with from_list_format's image text, the img span as 16 <imgpad>."""
    from vlmcli.families.qwen_vl.config import parse_qwen_vl
    from vlmcli.families.qwen_vl.processor import QwenVLProcessor
    from vlmcli.tokenizer import Tokenizer

    enc = tiktoken_encoding()
    e = lambda s: enc.encode(s, allowed_special="all")  # noqa: E731
    n = len(train_ranks())
    start, end, img, img_end, pad = n + 1, n + 2, n + 214, n + 215, n + 216
    cfg = parse_qwen_vl(json.loads((qwen_vl / "config.json").read_text()))
    processor = QwenVLProcessor(cfg, qwen_vl, Tokenizer.from_dir(qwen_vl, vocabulary=vocabulary(qwen_vl)))
    span = [img] + [pad] * 16 + [img_end]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nAnd this?"}]},
    ]
    nl = e("\n")
    system = [start] + e("system") + nl + e("You are a helpful assistant.") + [end]
    q1 = e("Picture 1: ") + span + e("\nPicture 2: ") + span + e("\nCompare them.")
    q2 = e("Picture 1: ") + span + e("\n\nAnd this?")
    expected = (system + nl + [start] + e("user") + nl + q1 + [end] + nl + [start] + e("assistant") + nl
                + e("Two cats.") + [end] + nl + [start] + e("user") + nl + q2 + [end] + nl + [start] + e("assistant") + nl)
    prompt = processor.build_prompt(messages, [16, 16, 16], 2048)
    assert prompt.ids == expected
    assert (prompt.image_tokens, prompt.n_images) == (48, 3)
    # a system message of the caller's replaces the default one
    own = processor.build_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], [], 2048)
    assert own.ids == [start] + e("system") + nl + e("Be brief.") + [end] + nl + [start] + e("user") + nl + e("Hi") + [end] + nl + [start] + e("assistant") + nl
    from vlmcli.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        processor.build_prompt(messages, [16, 16, 16], 60)


def test_base_model_prompt_is_the_plain_query(qwen_vl_base):
    from vlmcli.families.qwen_vl.config import parse_qwen_vl
    from vlmcli.families.qwen_vl.processor import QwenVLProcessor
    from vlmcli.tokenizer import Tokenizer

    enc = tiktoken_encoding()
    n = len(train_ranks())
    cfg = parse_qwen_vl(json.loads((qwen_vl_base / "config.json").read_text()))
    processor = QwenVLProcessor(cfg, qwen_vl_base, Tokenizer.from_dir(qwen_vl_base, vocabulary=vocabulary(qwen_vl_base)))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Generate the caption in English:"}]}]
    prompt = processor.build_prompt(messages, [16], 2048)
    assert prompt.ids == enc.encode("Picture 1: ") + [n + 214] + [n + 216] * 16 + [n + 215] + enc.encode(
        "\nGenerate the caption in English:"
    )


# ---- config and the full-size layout

QWEN_VL_CHAT_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0,
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "bf16": True, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False, "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True, "num_attention_heads": 32,
    "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
    "transformers_version": "4.31.0", "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": False,
    "use_logn_attn": True,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
               "output_dim": 4096, "patch_size": 14, "width": 1664},
    "vocab_size": 151936,
}


def test_qwen_vl_chat_key_layout_loads_on_meta(monkeypatch, tmp_path):
    from backends.cpu import CpuBackend
    from vlmcli import loader
    from vlmcli.errors import CheckpointError
    from vlmcli.families import describe, family_for

    tensors = {k: (s, "BF16") for k, s in published_tensors(QWEN_VL_CHAT_CONFIG).items()}
    # the published shapes of Qwen-VL-Chat's safetensors index
    for key, shape in {
        "transformer.wte.weight": (151936, 4096), "lm_head.weight": (151936, 4096),
        "transformer.h.31.attn.c_attn.weight": (12288, 4096), "transformer.h.31.attn.c_attn.bias": (12288,),
        "transformer.h.0.mlp.w1.weight": (11008, 4096), "transformer.h.0.mlp.c_proj.weight": (4096, 11008),
        "transformer.visual.positional_embedding": (256, 1664), "transformer.visual.conv1.weight": (1664, 3, 14, 14),
        "transformer.visual.transformer.resblocks.47.mlp.c_fc.weight": (8192, 1664),
        "transformer.visual.transformer.resblocks.0.attn.in_proj.weight": (4992, 1664),
        "transformer.visual.attn_pool.kv_proj.weight": (4096, 1664), "transformer.visual.attn_pool.query": (256, 4096),
        "transformer.visual.attn_pool.pos_embed": (256, 4096), "transformer.visual.attn_pool.attn.in_proj_weight": (12288, 4096),
        "transformer.visual.proj": (4096, 4096), "transformer.visual.ln_post.bias": (4096,),
    }.items():
        assert tensors[key][0] == shape, key
    assert len(tensors) == 3 + 32 * 8 + 7 + 48 * 12 + 11

    (tmp_path / "config.json").write_text(json.dumps(QWEN_VL_CHAT_CONFIG))
    monkeypatch.setattr(loader, "weight_files", lambda folder: None)
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: tensors)
    monkeypatch.setattr(loader, "iter_tensors", lambda files: iter(()))
    loaded = loader.load_model(tmp_path, CpuBackend())
    assert loaded.unused_tensors == []
    family = family_for(QWEN_VL_CHAT_CONFIG)
    ours = {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    mapped = {family.weight_name(k): shape for k, (shape, _) in tensors.items()}
    assert set(ours) <= set(mapped)
    for name, shape in ours.items():
        assert mapped[name] == shape, name
    assert sum(math.prod(s) for s, _ in tensors.values()) == 9_656_935_168  # Qwen-VL-Chat's 9.66B
    assert describe(QWEN_VL_CHAT_CONFIG) == "Qwen-VL (ViT-bigG, cross-attention resampler projector, QWen decoder)"
    cfg = loaded.config
    assert (cfg.image_token_id, cfg.max_visual_tokens(), cfg.text.context_length) == (151859, 256, 8192)
    assert (cfg.seq_length, cfg.use_dynamic_ntk, cfg.use_logn_attn) == (2048, True, True)
    assert cfg.text.eos_token_ids == (151643, 151644, 151645)  # <|endoftext|>, <|im_start|>, <|im_end|>

    missing = dict(tensors)
    missing.pop("transformer.visual.attn_pool.pos_embed")
    monkeypatch.setattr(loader, "tensor_shapes", lambda files: missing)
    with pytest.raises(CheckpointError, match="lacks 1 tensors"):
        loader.load_model(tmp_path, CpuBackend())


def test_config_refusals():
    from vlmcli.errors import CheckpointError, UnsupportedModelError
    from vlmcli.families import parse_config

    base = json.loads(json.dumps(QWEN_VL_CHAT_CONFIG))
    for change, error, match in (
        ({"rotary_pct": 0.5}, UnsupportedModelError, "rotary_pct"),
        ({"no_bias": False}, UnsupportedModelError, "no_bias"),
        ({"visual": None}, CheckpointError, "text-only Qwen"),
        ({"kv_channels": 64}, CheckpointError, "kv_channels"),
        ({"visual": dict(base["visual"], output_dim=2048)}, CheckpointError, "output_dim"),
        ({"visual": dict(base["visual"], width="big")}, CheckpointError, "width"),
        ({"visual": dict(base["visual"], image_start_id=3)}, CheckpointError, "image_start_id"),
    ):
        with pytest.raises(error, match=match):
            parse_config({**base, **change})
    with pytest.raises(CheckpointError, match="seq_length"):
        parse_config({**base, "seq_length": 1})


# ---- end to end


def test_describe_and_chat_end_to_end(qwen_vl, make_test_image, capsys, monkeypatch):
    from vlmcli.cli import main

    image = make_test_image(size=(64, 48), seed=5)
    runs = []
    for _ in range(2):
        code = main(["describe", str(image), "-m", str(qwen_vl), "--temperature", "0", "--max-tokens", "12", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "chat template" not in err  # the family's ChatML is the model's own format
        runs.append(json.loads(out))
    assert runs[0]["tokens"] == runs[1]["tokens"]
    assert len(runs[0]["tokens"]) == 12 and len(set(runs[0]["tokens"])) >= 6
    assert runs[0]["image_tokens"] == 16

    from vlmcli.chat import ChatSession
    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline

    pipe = Pipeline.load(str(qwen_vl), "cpu")
    n = len(train_ranks())
    assert pipe.stop_ids == {n, n + 1, n + 2}  # <|endoftext|>, <|im_start|>, <|im_end|>
    session = ChatSession(pipe, SamplingOptions(max_new_tokens=8, temperature=0))
    session.add_image(image)
    first = session.ask("What is in the picture?")
    # the second turn reuses the cached first one and answers as a fresh run does
    assert first.tokens == pipe.ask(session.messages[:-1], session.images, session.opts).tokens
    second = session.ask("And again?")
    assert second.tokens == pipe.ask(session.messages[:-1], session.images, session.opts).tokens
    assert second.reused_tokens >= first.prompt_tokens
    assert len(set(first.tokens + second.tokens)) >= 6

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\nWhat is in the picture?\n\nAnd again?\n"))
    code = main(["chat", "-m", str(qwen_vl), "-t", "0", "--max-tokens", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == first.text + "\n" + second.text + "\n"


# ---- past seq_length: dynamic NTK and logn attention


def qwen_reference_logits(t: dict, cfg: dict, ids: torch.Tensor, alpha: float) -> torch.Tensor:
    """modeling_qwen.py's QWenModel over `ids` written out: RoPE with base
    base * alpha^(d/(d-2)), queries at position p scaled by log_{seq_length}(p + 1) past
    seq_length, causal softmax attention, SwiGLU a1 * silu(a2); logits (T, vocab)."""
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd, S, T = d // H, cfg["seq_length"], ids.shape[1]
    base = cfg["rotary_emb_base"] * alpha ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()

    def rope(x):  # (T, H, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["layer_norm_epsilon"]))

    logn = torch.tensor([math.log(i, S) if i > S else 1.0 for i in range(1, T + 1)])
    x = t["transformer.wte.weight"][ids[0]]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg["num_hidden_layers"]):
        h = f"transformer.h.{i}."
        y = rms(x, t[h + "ln_1.weight"])
        q, k, v = F.linear(y, t[h + "attn.c_attn.weight"], t[h + "attn.c_attn.bias"]).split(d, -1)
        q, k, v = rope(q.view(T, H, hd)), rope(k.view(T, H, hd)), v.view(T, H, hd)
        q = q * logn[:, None, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        w = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        a = torch.einsum("hqk,khd->qhd", w, v).reshape(T, d)
        x = x + F.linear(a, t[h + "attn.c_proj.weight"])
        y = rms(x, t[h + "ln_2.weight"])
        y = F.linear(y, t[h + "mlp.w1.weight"]) * F.silu(F.linear(y, t[h + "mlp.w2.weight"]))
        x = x + F.linear(y, t[h + "mlp.c_proj.weight"])
    return F.linear(rms(x, t["transformer.ln_f.weight"]), t["lm_head.weight"])


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """seq_length 16: a 40-token prompt is past it (alpha 7, logn > 1 from position 16)."""
    from backends.cpu import CpuBackend
    from safetensors.torch import load_file

    from vlmcli.loader import load_model

    folder = write_qwen_vl(tmp_path_factory.mktemp("qwen_vl") / "short", seq_length=16)
    return load_model(folder, CpuBackend()), load_file(str(folder / "model.safetensors")), json.loads(
        (folder / "config.json").read_text()
    )


def test_ntk_alpha_steps():
    from vlmcli.families.qwen_vl.decoder import ntk_alpha

    assert [ntk_alpha(n, 2048) for n in (1, 2048, 2049, 4096, 4097, 8192)] == [1, 1, 3, 3, 7, 7]


@pytest.mark.parametrize("prompt_len", [12, 40])
def test_dynamic_ntk_and_logn_past_seq_length(short_context, prompt_len):
    """A prefill of prompt_len tokens then decode steps to 48 against the written-out
    reference: alpha is the prefill's (the steps keep it, as modeling_qwen.py's cached alpha)."""
    from vlmcli.families.qwen_vl.decoder import ntk_alpha

    loaded, t, cfg = short_context
    torch.manual_seed(2)
    ids = torch.randint(0, 700, (1, 48))
    alpha = ntk_alpha(prompt_len, 16)
    assert alpha == (1 if prompt_len <= 16 else 7)
    model = loaded.model
    with torch.no_grad():
        expected = qwen_reference_logits(t, cfg, ids, alpha)
        cache = model.new_cache(64)
        first = model.prefill(ids[:, :prompt_len], None, cache)[0]
        steps = [model.step(ids[:, i : i + 1], i, cache)[0] for i in range(prompt_len, 48)]
        # the capturable form: tensor slots
        cache2 = model.new_cache(64)
        model.prefill(ids[:, :prompt_len], None, cache2)
        tensor_steps = [model.step(ids[:, i : i + 1], torch.tensor([i]), cache2)[0] for i in range(prompt_len, 48)]
    scale = expected.abs().max().item()
    assert (first - expected[prompt_len - 1]).abs().max().item() < 2e-5 * scale
    assert (torch.stack(steps) - expected[prompt_len:]).abs().max().item() < 2e-5 * scale
    assert (torch.stack(tensor_steps) - expected[prompt_len:]).abs().max().item() < 2e-5 * scale
    # the scalings matter here: the plain decoder's logits are far off past position 16
    plain = qwen_reference_logits(t, {**cfg, "seq_length": 10**6}, ids, 1.0)
    assert (plain[20:] - expected[20:]).abs().max().item() > 0.05 * scale


def test_info_names_the_resampler(qwen_vl, capsys):
    from vlmcli.cli import main

    assert main(["info", str(qwen_vl)]) == 0
    out = capsys.readouterr().out
    assert "Qwen-VL (qwen)" in out
    assert "projector  cross-attention resampler, 32 -> 128" in out
    assert "decoder    qwen: 2 layers, width 128, 4 heads / 4 KV heads, MLP 96" in out
    assert "16 tokens per image" in out
    assert main(["info", str(qwen_vl), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["projector"] == {"type": "cross_attention", "activation": "none", "in": 32, "out": 128}
    assert data["checkpoint"]["unused_tensors"] == 0


def test_hub_download_fetches_the_tiktoken_vocabulary():
    import fnmatch

    from vlmcli.checkpoint import HUB_PATTERNS

    # Qwen/Qwen-VL-Chat's files: what a download keeps (never the remote code or the font)
    files = ["config.json", "generation_config.json", "model-00001-of-00010.safetensors",
             "model.safetensors.index.json", "qwen.tiktoken", "tokenizer_config.json", "modeling_qwen.py",
             "visual.py", "tokenization_qwen.py", "qwen_generation_utils.py", "SimSun.ttf"]
    kept = [f for f in files if any(fnmatch.fnmatch(f, p) for p in HUB_PATTERNS)]
    assert kept == files[:6]


@pytest.mark.slow
def test_compiled_step_past_seq_length_gives_eager_tokens(tmp_path, make_test_image):
    """The tensor-slot step compiled: logn's per-position scale is computed in the graph and
    the NTK tables are rebuilt in place, so the compiled step keeps the eager tokens."""
    import torch._dynamo

    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline

    torch._dynamo.reset()
    folder = write_qwen_vl(tmp_path / "short", seq_length=64)  # the 70-token prompt is past it
    image = make_test_image(size=(64, 48), seed=6)
    opts = SamplingOptions(max_new_tokens=12, temperature=0)
    pipe = Pipeline.load(str(folder), "cpu")
    pipe.stop_ids = set()
    eager = pipe.describe([image], "Describe this image.", opts)
    assert eager.prompt_tokens > 64 and len(set(eager.tokens)) >= 6
    assert pipe.compile_step()
    assert pipe.describe([image], "Describe this image.", opts).tokens == eager.tokens


def test_server_batch_gives_each_request_its_alone_tokens(qwen_vl, make_test_image):
    """Three requests (two with images, prompts of different lengths) decoded as one batch
    of rows at different slots: each answer is the pipeline's own, alone (logn's per-row
    query scale takes (B, T) slots)."""
    from tests.test_server import _run_jobs
    from vlmcli.generate import SamplingOptions
    from vlmcli.pipeline import Pipeline
    from vlmcli.sequence import user_message
    from vlmcli.server.engine import Engine

    pipe = Pipeline.load(str(qwen_vl), "cpu")
    opts = SamplingOptions(max_new_tokens=10, temperature=0)
    a, b = make_test_image(size=(64, 48), seed=7), make_test_image(size=(40, 70), seed=8)
    requests = [([user_message(p, len(ims))], ims, opts) for p, ims in (
        ("What is in the picture?", [a]), ("hi", []), ("Describe the picture in a long sentence please.", [b]))]
    alone = [pipe.ask(m, ims, o) for m, ims, o in requests]
    events = _run_jobs(Engine(pipe, max_batch=3), pipe, requests)
    for got, want in zip(events, alone):
        assert got[-1].tokens == want.tokens
    assert len({tuple(w.tokens) for w in alone}) == 3
