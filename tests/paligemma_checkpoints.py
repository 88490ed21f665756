"""Tiny random PaliGemma checkpoints, written by transformers (a test-only dependency).

As in tests/checkpoints.py and tests/family_checkpoints.py, every file is the real Hugging
Face layout, written by `PaliGemmaForConditionalGeneration.save_pretrained` and
`PaliGemmaProcessor.save_pretrained`:

    config.json, model.safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json, preprocessor_config.json (SiglipImageProcessor with
    image_seq_length), processor_config.json

    text="gemma"    google/paligemma-3b-mix-224's shape: SigLIP + Gemma (MQA, head_dim apart
                    from hidden / heads, GeGLU, sqrt(d) embedding scale, (1 + w) RMSNorm)
    text="gemma2"   google/paligemma2-3b-pt-224's shape: SigLIP + Gemma2 (attention logit
                    soft-capping, final logit soft-capping, sandwich norms, query_pre_attn_scalar,
                    sliding-window layers alternating with full ones)

The tokenizer is a Gemma one in transformers 5's own shape (BPE with byte fallback, spaces as
"▁", no prefix space; <pad> <eos> <bos> <unk> <mask> at ids 0-4), trained on the corpus of
tests/checkpoints.py, with <image> added as a special token and the 1024 <locNNNN> + 128
<segNNN> tokens the processor adds. Tiny sizes: SigLIP width 32, 3 layers, 30 px images in
6 px patches (25 image tokens); decoder width 64, 3 layers (Gemma2: sliding, full, sliding
with an 8-token window, shorter than the 25 image tokens of the prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import BYTE_TOKENS, CORPUS, DEFAULT_WEIGHT_SCALE, _rename_safetensors_keys, randomize_weights_
from tests.family_checkpoints import SIGLIP_MEAN, SIGLIP_STD, tiny_siglip_vision_config

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def train_gemma_tokenizer(vocab_size: int = 512):
    """transformers' GemmaTokenizer over a BPE trained on CORPUS (deterministic), with
    <image> as an added special token, as PaliGemma's tokenizer has it."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=GEMMA_SPECIALS + BYTE_TOKENS,
        show_progress=False,
        min_frequency=1,
    )
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = GemmaTokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", normalized=False, special=True)]})
    return tok


def tiny_gemma_text_config(kind: str, vocab_size: int, **overrides):
    from transformers import Gemma2Config, GemmaConfig

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=24,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    if kind == "gemma":
        cls = GemmaConfig
        common.update(hidden_act="gelu_pytorch_tanh")
    elif kind == "gemma2":
        cls = Gemma2Config
        common.update(
            num_key_value_heads=2,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=24,  # not head_dim: the scale must come from the config
            attn_logit_softcapping=4.0,  # small enough to bend the tiny model's scores
            final_logit_softcapping=8.0,
            sliding_window=8,
        )
    else:
        raise ValueError(f"unknown decoder kind {kind!r}")
    common.update(overrides)
    return cls(**common)


def _to_module_layout(key: str) -> str:
    """save_pretrained's names -> transformers 5's in-memory names."""
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model.") :]
    if key.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + key
    return key


def make_paligemma_checkpoint(
    path,
    *,
    text: str = "gemma",
    text_overrides: dict | None = None,
    image_size: int = 30,
    patch_size: int = 6,
    key_layout: str = "saved",
    seed: int = 0,
    weight_scale: float = DEFAULT_WEIGHT_SCALE,
    embedding_std: float | None = None,
) -> Path:
    """Write a tiny random PaliGemma (text "gemma") or PaliGemma 2 (text "gemma2") to `path`.
    key_layout: "saved" (what save_pretrained writes) or "module" (transformers 5's names)."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_gemma_tokenizer()
    n_tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=3,
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    )
    image_processor.image_seq_length = n_tokens
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <loc*> / <seg*>
    vocab_size = len(tok)
    vision = tiny_siglip_vision_config(image_size, patch_size)
    text_config = tiny_gemma_text_config(text, vocab_size, **(text_overrides or {}))
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=text_config.hidden_size,
        hidden_size=text_config.hidden_size,
        vocab_size=vocab_size,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    randomize_weights_(model, weight_scale, seed)
    if embedding_std is None and text == "gemma2":
        embedding_std = 0.05
    if embedding_std is not None:
        # Gemma 2's sandwich norms keep every block's output near unit scale, so the sqrt(d)
        # scaled embedding would dominate the residual and the tied head would repeat the
        # last token; smaller embeddings let the blocks decide (greedy outputs vary)
        gen = torch.Generator().manual_seed(seed + 1)
        emb = model.model.language_model.embed_tokens.weight
        with torch.no_grad():
            emb.copy_(torch.randn(emb.shape, generator=gen) * embedding_std)
    model.save_pretrained(path)
    if key_layout == "module":
        _rename_safetensors_keys(path, _to_module_layout)
    elif key_layout != "saved":
        raise ValueError(f"unknown key_layout {key_layout!r}")
    processor.save_pretrained(path)
    return path
