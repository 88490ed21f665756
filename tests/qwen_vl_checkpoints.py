"""Tiny random Qwen-VL checkpoints in the published remote-code layout (Qwen/Qwen-VL-Chat):

    config.json (model_type qwen, the decoder's keys at the top level, `visual` for the
    tower), model.safetensors with `transformer.*` / `transformer.visual.*` / `lm_head.weight`,
    qwen.tiktoken (a byte-level BPE trained here on a small mixed corpus), tokenizer_config.json
    (QWenTokenizer, as the hub repos name it), generation_config.json (chat_format, eos).

The tensor names and shapes (`published_tensors`) are written out from modeling_qwen.py and
visual.py's module structure, not from vlm's names. Tiny sizes: 84 px images in 14 px patches
(6 x 6 patches, so the 16 x 16 positional table is interpolated as in the 448 px model, and
the resampler's 4 x 4 key positions are too), tower width 32 with 2 blocks; decoder and
resampler width 128 (one 128-wide resampler head, as output_dim // 128), 2 layers.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

TINY_VISUAL = dict(heads=2, image_size=84, image_start_id=None, layers=2, mlp_ratio=2.5, output_dim=128,
                   patch_size=14, width=32, n_queries=16)

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tokenization_qwen.py's special tokens, in its order, after the ranks
SPECIALS = (
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    + tuple(f"<|extra_{i}|>" for i in range(205))
    + ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
)

CORPUS = (
    "You are a helpful assistant. Describe the image in detail. What is in the picture? "
    "A cat sits on a red mat near the window, and the sun is shining. Picture 1: the image shows "
    "def main():\n    return [x * 2 for x in range(10)]\n\nclass Foo:\n    pass\n"
    "这是一只猫。图片里有什么？请描述这张图片。你好，世界！ 日本語のテキストも少し。"
    "emoji 😀🐱🚀 and   spaces\t\ttabs\n\n\nnewlines 12345 67890 it's we're they've I'm"
)


def train_ranks(corpus: str = CORPUS, merges: int = 300) -> dict[bytes, int]:
    """A byte-level BPE: the 256 bytes, then the most frequent adjacent pair of each round
    over the PAT_STR pieces of the corpus (what tiktoken's educational trainer does)."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in piece.encode()] for piece in regex.findall(PAT_STR, corpus)]
    for _ in range(merges):
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (a, b), _n = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def tiny_config(n_ranks: int, **overrides) -> dict:
    n_vocab = n_ranks + len(SPECIALS)
    visual = dict(TINY_VISUAL, image_start_id=n_ranks + SPECIALS.index("<img>"))
    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen", "hidden_size": 128, "intermediate_size": 2 * 96, "kv_channels": 32,
        "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "no_bias": True,
        "num_attention_heads": 4, "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 1.0,
        "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer", "use_dynamic_ntk": True, "use_logn_attn": True,
        "vocab_size": math.ceil(n_vocab / 64) * 64, "visual": visual,
    }
    cfg.update(overrides)
    return cfg


def published_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor QWenLMHeadModel's state_dict holds for this config, with its shape, from
    modeling_qwen.py (QWenModel: wte, h.N, ln_f; QWenLMHeadModel: lm_head) and visual.py
    (VisionTransformer with its Resampler attn_pool)."""
    d, ff, V = cfg["hidden_size"], cfg["intermediate_size"] // 2, cfg["vocab_size"]
    t = {"transformer.wte.weight": (V, d), "transformer.ln_f.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        t |= {p + "ln_1.weight": (d,), p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_attn.bias": (3 * d,),
              p + "attn.c_proj.weight": (d, d), p + "ln_2.weight": (d,), p + "mlp.w1.weight": (ff, d),
              p + "mlp.w2.weight": (ff, d), p + "mlp.c_proj.weight": (d, ff)}
    v = cfg["visual"]
    w, out, q = v["width"], v["output_dim"], v.get("n_queries", 256)
    hidden = int(w * v["mlp_ratio"])
    p = "transformer.visual."
    t |= {p + "positional_embedding": (256, w), p + "proj": (out, out), p + "conv1.weight": (w, 3, v["patch_size"], v["patch_size"]),
          p + "ln_pre.weight": (w,), p + "ln_pre.bias": (w,), p + "ln_post.weight": (out,), p + "ln_post.bias": (out,)}
    for i in range(v["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        t |= {b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
              b + "attn.in_proj.weight": (3 * w, w), b + "attn.in_proj.bias": (3 * w,),
              b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
              b + "mlp.c_fc.weight": (hidden, w), b + "mlp.c_fc.bias": (hidden,),
              b + "mlp.c_proj.weight": (w, hidden), b + "mlp.c_proj.bias": (w,)}
    a = p + "attn_pool."
    t |= {a + "query": (q, out), a + "pos_embed": (q, out), a + "attn.in_proj_weight": (3 * out, out),
          a + "attn.in_proj_bias": (3 * out,), a + "attn.out_proj.weight": (out, out), a + "attn.out_proj.bias": (out,),
          a + "ln_q.weight": (out,), a + "ln_q.bias": (out,), a + "ln_kv.weight": (out,), a + "ln_kv.bias": (out,)}
    if w != out:
        t[a + "kv_proj.weight"] = (out, w)
    return t


def sincos_reference(dim: int, side: int) -> torch.Tensor:
    """The MAE 2-D sin-cos table from its formula, in float64: position (row r, column c);
    channels [0, dim/2) encode c, [dim/2, dim) encode r, each as [sin(p w_i), cos(p w_i)] with
    w_i = 10000^(-i / (dim/4)), i < dim/4."""
    quarter = dim // 4
    w = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    r, c = r.reshape(-1, 1) * w, c.reshape(-1, 1) * w
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1)


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights large enough that greedy tokens vary from step to step; norms near one,
    the resampler's positions its sin-cos table."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in published_tensors(cfg).items():
        if name.endswith("pos_embed"):
            side = math.isqrt(shape[0])
            out[name] = sincos_reference(shape[1], side).float()
        elif name.split(".")[-2].startswith("ln") and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            scale = 1.0 if name.endswith(("wte.weight", "positional_embedding", "query")) else 2.0 / math.sqrt(fan_in)
            out[name] = scale * torch.randn(shape, generator=g)
    return out


def write_qwen_vl(folder: Path, *, chat: bool = True, seed: int = 0, **overrides) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks()
    write_tiktoken(folder / "qwen.tiktoken", ranks)
    cfg = tiny_config(len(ranks), **overrides)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in random_tensors(cfg, seed).items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }))
    eod = len(ranks)
    (folder / "generation_config.json").write_text(json.dumps({
        "chat_format": "chatml" if chat else "raw", "eos_token_id": eod, "pad_token_id": eod,
        "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.3,
    }))
    return folder
