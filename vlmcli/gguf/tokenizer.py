"""A `tokenizers` tokenizer from a GGUF's `tokenizer.ggml.*` metadata, shaped as the
tokenizer.json transformers builds from the same file (transformers/integrations/gguf/
gguf_tokenizer_mapping.py), so ids and text agree with `from_pretrained(gguf_file=...)`.

    tokenizer.ggml.model   what vlm builds
    gpt2                   byte-level BPE from `tokens` + `merges`; the split regex of
                           `tokenizer.ggml.pre` (llama-bpe, qwen2 ...; GPT-2's own otherwise)
    llama                  SentencePiece-style BPE with byte fallback and a "▁" Metaspace;
                           the merges from the file, or recovered from `scores` when it has none
                           (Gemma: from the token order, its tokens of spaces respelled with "▁")

Token types (llama.cpp's llama_token_type): 3 CONTROL tokens become special added tokens,
4 USER_DEFINED plain added tokens, so both are matched whole in text.
"""

from __future__ import annotations

from typing import Any

from vlmcli.errors import UnsupportedModelError
from vlmcli.gguf.reader import GGUFFile
from vlmcli.tokenizer import byte_level_chars

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before the merges; others get GPT-2's regex
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
          "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
          "deepseek-r1-qwen": _QWEN2_SPLIT}

SUPPORTED_MODELS = ("gpt2", "llama")


_BYTE_CHARS = byte_level_chars()
BYTE_ALPHABET = set(_BYTE_CHARS.values())


def build_tokenizer(file: GGUFFile, image_token: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config.json dict) for the file's vocabulary.
    image_token: an added special token for image slots (appended when the vocabulary
    lacks it: llama.cpp's LLaVA files have none, it places images itself)."""
    kind = file.get("tokenizer.ggml.model")
    tokens = file.get("tokenizer.ggml.tokens")
    if kind not in SUPPORTED_MODELS or not tokens:
        found = f"tokenizer '{kind}'" if kind else "no tokenizer"
        raise UnsupportedModelError(
            f"{file.path.name} has {found}; vlm builds tokenizers of type {', '.join(SUPPORTED_MODELS)}"
        )
    types = file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level(tokens, file.get("tokenizer.ggml.merges") or [], file.get("tokenizer.ggml.pre"))
        add_bos = bool(file.get("tokenizer.ggml.add_bos_token", False))
    else:
        gemma = file.architecture in ("gemma", "gemma2", "gemma3")
        tok = _sentencepiece(tokens, file.get("tokenizer.ggml.merges"), file.get("tokenizer.ggml.scores"), gemma)
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos = bool(file.get("tokenizer.ggml.add_bos_token", True))
    _add_typed_tokens(tok, tokens, types, byte_level=kind == "gpt2")

    def token(key: str) -> str | None:
        i = file.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(file.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    config = {k: v for k, v in config.items() if v is not None}
    bos = config.get("bos_token")
    if add_bos and bos is not None:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokens.index(bos))]
        )
    if image_token is not None:
        from tokenizers import AddedToken

        if tok.token_to_id(image_token) is None:
            tok.add_special_tokens([AddedToken(image_token, normalized=False, special=True)])
        config["extra_special_tokens"] = {"image_token": image_token}
    return tok, config


def _byte_level(tokens: list[str], merges: list[str], pre: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    # a token outside the byte alphabet (a mislabelled special) is respelled byte by byte
    vocab = {t if set(t) <= BYTE_ALPHABET else "".join(_BYTE_CHARS[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    split = SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None, gemma: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if gemma:  # a token of spaces is stored as spaces; the BPE looks it up as "▁"s
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        # Gemma's scores do not follow its merge order; its token order does
        rank = {t: -i for i, t in enumerate(tokens)} if gemma or not scores else dict(zip(tokens, scores))
        pairs = _merges_from_scores(vocab, rank)
    unk = "<unk>" if "<unk>" in vocab else None  # the name LlamaTokenizer / GemmaTokenizer default to
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, unk_token=unk))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:  # GemmaTokenizer: spaces become "▁" in the normalizer, no prefix space
        from tokenizers import normalizers

        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:  # LlamaTokenizer: a "▁" prepended to the first word, stripped again when decoding
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of every token into two vocabulary pieces, best-scored token first
    (transformers' generate_merges, which its GGUF tokenizers use)."""
    merges = []
    for piece, score in rank.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_typed_tokens(tok, tokens: list[str], types: list[int], byte_level: bool) -> None:
    from tokenizers import AddedToken

    control = [t for t, k in zip(tokens, types) if k == CONTROL and (not byte_level or set(t) <= BYTE_ALPHABET)]
    if control:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
