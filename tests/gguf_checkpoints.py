"""GGUF files for the tests, written with `gguf.GGUFWriter` in llama.cpp's layout from a
Hugging Face checkpoint of tests/checkpoints.py (so vlm on the GGUF pair can be compared
with vlm and transformers on the checkpoint it was written from).

    write_llava_gguf(hf_folder, out, qtype) -> (model.gguf, mmproj.gguf)

The language model as convert_hf_to_gguf.py writes a Llama: `blk.N.*` names, q/k rows
permuted for llama.cpp's RoPE (LlamaModel.permute), a SentencePiece-type vocabulary
(`tokenizer.ggml.model` llama: tokens, scores, token types, merges), the chat template,
and 2-D weights in `qtype` (F32, F16, Q8_0, Q4_0, Q4_1: what gguf.quants can write), norms F32.
The mmproj as tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py writes LLaVA's:
`clip.*` keys, the tower cut after the deepest feature layer (`clip.vision.feature_layer`,
non-negative), CLIP's fc1 stored as `ffn_down` and fc2 as `ffn_up` (that script's naming),
no post_layernorm, `mm.0` / `mm.2` for the projector, the patch embedding in F16 unless
qtype is F32 (the script always writes F16; F32 keeps the exact comparison exact).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

# llama.cpp's llama_token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


# Where each K-quant block keeps its fp16 super-block scales (d, and dmin where it has one),
# from ggml-common.h's block_q4_K / block_q5_K / block_q6_K.
_K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random bytes of `kind` blocks for a tensor of `shape`, whose fp16 scales are set to
    small finite values (random bytes there would be inf/NaN): valid quantized weights."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(shape)) // block
    data = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = {"Q6_K": 2e-5}.get(kind, 2e-4)
    for at in _K_SCALES[kind]:
        values = (rng.random(n_blocks) * scale + scale / 2).astype(np.float16)
        data[:, at : at + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(*shape[:-1], shape[-1] // block * size)


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes it (not vlm's code:
    the tests check vlm's inverse against it)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def stored_type(tensor: torch.Tensor, qtype: str) -> str:
    """The type a tensor is written in: `qtype` where its rows are whole blocks of it, else
    F32 (as llama.cpp falls back for rows it cannot quantize); 1-D tensors always F32."""
    import gguf

    if qtype == "F32" or tensor.ndim < 2:
        return "F32"
    if qtype in ("F16", "BF16"):
        return qtype
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return "F32" if tensor.shape[-1] % block else qtype


def as_read_back(tensor: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a reader gets back for `tensor` written by _add with `qtype` (float32)."""
    import gguf

    kind = stored_type(tensor, qtype)
    data = tensor.detach().float()
    if kind == "F32":
        return data
    if kind == "F16":
        return data.half().float()
    q = gguf.GGMLQuantizationType[kind]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data.numpy(), q), q)).reshape(data.shape)


# HF key -> the qtype each writer passed for it (filled as files are written), so a test can
# build the checkpoint "as the GGUF stores it" (roundtrip_checkpoint)
WRITTEN_AS: dict[str, str] = {}


def _add(writer, name: str, tensor: torch.Tensor, qtype: str, key: str | None = None) -> None:
    import gguf

    if key is not None:
        WRITTEN_AS[key] = qtype
    data = tensor.detach().float().numpy()
    kind = stored_type(tensor, qtype)
    if kind == "F32":
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        q = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)


def roundtrip_checkpoint(hf_folder: Path, out: Path, qtype: str) -> Path:
    """A copy of `hf_folder` whose tensors are what write_llava_gguf(qtype) stores, read
    back (quantized and dequantized): vlm on it and on the GGUF pair must agree exactly."""
    from safetensors.torch import save_file

    shutil.copytree(hf_folder, out)
    write_llava_gguf(hf_folder, out / ".gguf", qtype)  # fills WRITTEN_AS for these keys
    shutil.rmtree(out / ".gguf")
    state = {k: as_read_back(v, WRITTEN_AS.get(k, "F32")) for k, v in _state(hf_folder).items()}
    for shard in out.glob("*.safetensors"):
        shard.unlink()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_language_model(
    hf_folder: Path, path: Path, qtype: str = "F32", arch_name: str | None = None, merges: bool = True,
    raw: dict | None = None,
) -> Path:
    """merges=False: no tokenizer.ggml.merges, as SentencePiece Llama files have (the
    merges are then recovered from the scores). raw: GGUF name -> (ggml type name, its
    shape[, seed]): that tensor written as bytes of that type instead: random blocks with
    small scales when a seed is given (K-quant weights no writer here can make), else zeros."""
    import gguf

    config = json.loads((hf_folder / "config.json").read_text())
    text = config.get("text_config", config)
    if arch_name is None:  # llama.cpp writes Mistral as llama
        arch_name = {"mistral": "llama"}.get(text.get("model_type", "llama"), text.get("model_type", "llama"))
    state = _state(hf_folder)
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_folder / "tokenizer_config.json").read_text())
    template = None
    if (hf_folder / "chat_template.json").exists():
        template = json.loads((hf_folder / "chat_template.json").read_text())["chat_template"]

    w = gguf.GGUFWriter(str(path), arch=arch_name)
    w.add_name("tiny-llava-test")
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    w.add_context_length(text["max_position_embeddings"])
    w.add_embedding_length(text["hidden_size"])
    w.add_block_count(text["num_hidden_layers"])
    w.add_feed_forward_length(text["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != text["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(text.get("rope_parameters", {}).get("rope_theta", text.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(text["rms_norm_eps"])
    w.add_vocab_size(text["vocab_size"])

    # The vocabulary in id order; scores rank the learned pieces by merge order, as
    # SentencePiece's do; the merges too (llama.cpp's converter writes them when it has them).
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok["added_tokens"]}
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    for i, t in added.items():
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
        tokens[i] = t["content"]
    # byte-fallback BPE is a SentencePiece-style (llama) vocabulary; plain BPE a byte-level (gpt2) one
    spm = bool(tok["model"].get("byte_fallback"))
    types = []
    for i, piece in enumerate(tokens):
        if piece == tok["model"].get("unk_token"):
            types.append(UNKNOWN)
        elif i in added and added[i]["special"]:
            types.append(CONTROL)
        elif piece.startswith("<0x") and len(piece) == 6:
            types.append(BYTE)
        else:
            types.append(NORMAL)
    w.add_tokenizer_model("llama" if spm else "gpt2")
    if not spm:
        w.add_tokenizer_pre("qwen2")  # the split regex of the Qwen2 tokenizers the fixtures copy
    w.add_token_list(tokens)
    if spm:
        w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    if merges:
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    for key, setter in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                        ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        if tok_cfg.get(key) is not None:
            setter(tokens.index(tok_cfg[key]))
    w.add_add_bos_token(spm)
    if template is not None:
        w.add_chat_template(template)

    # a LLaVA checkpoint's decoder, or a causal LM's (Qwen2ForCausalLM, GemmaForCausalLM)
    prefix, head = ("language_model.model.", "language_model.lm_head.weight") if "text_config" in config else ("model.", "lm_head.weight")
    lm_names = {
        "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    }
    block = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
    }
    for key, tensor in state.items():
        if arch_name == "gemma" and key.endswith("norm.weight"):
            tensor = tensor + 1  # convert_hf_to_gguf's GemmaModel: llama.cpp's norm multiplies by w
        if key == head:
            if not text.get("tie_word_embeddings", config.get("tie_word_embeddings")):
                _add(w, "output.weight", tensor, qtype, key)
            continue
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in lm_names:
            _add(w, lm_names[rest], tensor, qtype, key)
            continue
        _, i, part = rest.split(".", 2)
        if arch_name == "llama" and part == "self_attn.q_proj.weight":
            tensor = llama_cpp_permute(tensor, heads, heads)
        elif arch_name == "llama" and part == "self_attn.k_proj.weight":
            tensor = llama_cpp_permute(tensor, heads, kv)
        name = f"blk.{i}.{block[part]}"
        if raw and name in raw:
            kind, shape = gguf.GGMLQuantizationType[raw[name][0]], raw[name][1]
            if len(raw[name]) > 2:
                data = random_blocks(kind.name, shape, raw[name][2])
            else:
                block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
                data = np.zeros((*shape[:-1], shape[-1] // block_size * type_size), dtype=np.uint8)
            w.add_tensor(name, data, raw_dtype=kind)  # data is the byte shape; the writer derives the rest
            continue
        _add(w, name, tensor, qtype, key)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_mmproj(hf_folder: Path, path: Path, qtype: str = "F32") -> Path:
    import gguf

    config = json.loads((hf_folder / "config.json").read_text())
    vision = config["vision_config"]
    pre = json.loads((hf_folder / "preprocessor_config.json").read_text())
    state = _state(hf_folder)
    n_layers = vision["num_hidden_layers"]
    layers = config.get("vision_feature_layer", -2)
    layers = [layers] if isinstance(layers, int) else list(layers)
    layers = [i if i >= 0 else n_layers + i + 1 for i in layers]  # the script's to_non_negative
    kept = max(layers)

    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_name("tiny-llava-test mmproj")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", vision["image_size"])
    w.add_uint32("clip.vision.patch_size", vision["patch_size"])
    w.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", vision.get("projection_dim", 0))
    w.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vision["layer_norm_eps"])
    w.add_uint32("clip.vision.block_count", kept)
    w.add_array("clip.vision.feature_layer", layers)
    w.add_array("clip.vision.image_mean", pre["image_mean"])
    w.add_array("clip.vision.image_std", pre["image_std"])
    w.add_bool("clip.use_gelu", vision.get("hidden_act") == "gelu")
    if config["model_type"] == "llava_next":  # llava_surgery_v2 + the script's NeXT keys
        w.add_array("clip.vision.image_grid_pinpoints", [p for pair in config["image_grid_pinpoints"] for p in pair])
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")

    prefix = "vision_tower."
    names = {"embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.patch_embedding.bias": "v.patch_embd.bias",  # SigLIP's
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}  # sic: the legacy script's naming
    proj_qtype = "F32" if qtype == "F32" else "F16"
    for key, tensor in state.items():
        if key in ("image_newline", "model.image_newline"):
            _add(w, "model.image_newline", tensor, "F32", key)
            continue
        if key.startswith("multi_modal_projector."):
            layer, kind = key.split(".")[1:]
            _add(w, f"mm.{0 if layer == 'linear_1' else 2}.{kind}", tensor, proj_qtype, key)
            continue
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):].removeprefix("vision_model.")
        if rest in names:
            _add(w, names[rest], tensor, "F32" if qtype == "F32" or tensor.ndim < 4 else "F16", key)
            continue
        if not rest.startswith("encoder.layers."):
            continue  # post_layernorm: the script drops it for LLaVA
        i, part = rest[len("encoder.layers."):].split(".", 1)
        if int(i) >= kept:
            continue
        module, kind = part.rsplit(".", 1)
        _add(w, f"v.blk.{i}.{block[module]}.{kind}", tensor, proj_qtype, key)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_llava_gguf(hf_folder: Path, out: Path, qtype: str = "F32") -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = write_language_model(Path(hf_folder), out / f"tiny-llava-{qtype}.gguf", qtype)
    mmproj = write_mmproj(Path(hf_folder), out / f"mmproj-tiny-llava-{qtype}.gguf", qtype)
    return model, mmproj
