"""The language-model GGUF: `{arch}.*` metadata -> a Hugging Face text_config, and
llama.cpp's tensor names -> the names transformers' checkpoints use.

    llama.cpp                  Hugging Face (under `model.` / `language_model.model.`)
    token_embd.weight          embed_tokens.weight
    output_norm.weight         norm.weight
    output.weight              lm_head.weight (absent: tied to the embeddings)
    blk.N.attn_norm            layers.N.input_layernorm
    blk.N.attn_q/k/v/output    layers.N.self_attn.q_proj/k_proj/v_proj/o_proj
    blk.N.ffn_norm             layers.N.post_attention_layernorm
    blk.N.ffn_gate/up/down     layers.N.mlp.gate_proj/up_proj/down_proj

Two rewrites llama.cpp's converter (convert_hf_to_gguf.py) makes are undone here:
* Llama's q/k rows are permuted to interleave each head's rotary halves (LlamaModel.permute:
  (heads, 2, d/2) -> (heads, d/2, 2)), for llama.cpp's RoPE layout; Qwen2 and Gemma are
  stored as trained.
* Gemma's RMSNorm weights are stored plus one (llama.cpp's norm multiplies by w; Gemma's by 1 + w).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlmcli.errors import UnsupportedModelError
from vlmcli.gguf.reader import GGUFFile, short_float

# general.architecture -> the Hugging Face model_type of its decoder
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}

_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def check_architecture(file: GGUFFile) -> str:
    arch = file.architecture
    if arch is None:
        raise UnsupportedModelError(f"{file.path.name} has no general.architecture: not a llama.cpp model file")
    if arch == "clip":
        raise UnsupportedModelError(
            f"{file.path.name} is a vision projector (mmproj) file; give the language model with -m and this with --mmproj"
        )
    if int(file.get("split.count", 1)) > 1:
        raise UnsupportedModelError(
            f"{file.path.name} is part {int(file.get('split.no', 0)) + 1} of a GGUF split in {file.get('split.count')}; "
            f"vlm reads whole files (llama-gguf-split --merge joins them)"
        )
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{file.path.name} is a GGUF of architecture '{arch}'; vlm runs {', '.join(ARCHITECTURES)} decoders"
        )
    if "rope_freqs.weight" in file.tensors:  # Llama 3.1's per-frequency RoPE factors
        raise UnsupportedModelError(f"{file.path.name} scales RoPE per frequency (rope_freqs.weight), which vlm does not support yet")
    return arch


def text_config(file: GGUFFile) -> dict[str, Any]:
    """The decoder's config.json (text_config) in transformers' keys."""
    arch = check_architecture(file)

    def key(name: str, default: Any = None) -> Any:
        return file.get(f"{arch}.{name}", default)

    def need(name: str) -> Any:
        return file.require(f"{arch}.{name}")

    d_model = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts (hybrid models)
        raise UnsupportedModelError(f"{file.path.name} has per-layer KV head counts, which vlm does not support")
    tokens = file.get("tokenizer.ggml.tokens") or []
    cfg: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": d_model,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": int(key("attention.key_length", d_model // n_heads)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": short_float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": short_float(key("rope.freq_base", 10000.0)),
        # the embedding's rows: a vocabulary padded past its tokens is still that many rows
        "vocab_size": _rows(file, "token_embd.weight") or int(key("vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in file.tensors,
    }
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedModelError(f"{file.path.name}: RoPE scaling '{scaling}' is not supported (supported: linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": short_float(key("rope.scaling.factor", 1.0))}
    for name, meta in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = file.get(f"tokenizer.ggml.{meta}")
        if value is not None:
            cfg[name] = int(value)
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def _rows(file: GGUFFile, name: str) -> int | None:
    info = file.tensors.get(name)
    return info.shape[0] if info is not None else None


def hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight' (under the model
    prefix); 'output.weight' -> 'lm_head.weight'; None for a tensor vlm does not use."""
    if name == "output.weight":
        return "lm_head.weight"
    if name in _TOP:
        return _TOP[name]
    m = _BLK.match(name)
    if m and m.group(2) in _BLOCK:
        return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def undo_rewrites(arch: str, name: str, tensor: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """The tensor as transformers holds it (see the module docstring)."""
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        return unpermute_rope(tensor, heads)
    if arch == "gemma" and name.endswith("norm.weight"):
        return tensor.float() - 1
    return tensor


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: rows (heads, d/2, 2) -> (heads, 2, d/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

