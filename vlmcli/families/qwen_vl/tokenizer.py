"""Qwen-VL's tokenizer (tokenization_qwen.py): a tiktoken BPE in `qwen.tiktoken`, turned
once into a `tokenizers` tokenizer so the pipeline keeps one Tokenizer class and vlm needs
no tiktoken at run time.

    qwen.tiktoken   one "base64(token bytes) rank" per line; rank = id
    special tokens  after the ranks, in tokenization_qwen.py's order: <|endoftext|>,
                    <|im_start|>, <|im_end|>, <|extra_0|> .. <|extra_204|>, then <ref>, </ref>,
                    <box>, </box>, <quad>, </quad>, <img>, </img>, <imgpad>
    encoding        NFC, then tiktoken: split by PAT_STR; a piece that is a token is that token,
                    else byte-pair merges, lowest-ranked merged token first

tiktoken's BPE is the `tokenizers` BPE over the byte-level alphabet with, for every token of
two or more bytes, the merge of its lowest-ranked split into two tokens, ranked by the token's
own rank (the conversion transformers' TikTokenConverter uses), with `ignore_merges` for the
whole-piece lookup.
"""

from __future__ import annotations

import base64
from pathlib import Path

from vlmcli.errors import CheckpointError
from vlmcli.tokenizer import byte_level_chars

TIKTOKEN_FILE = "qwen.tiktoken"

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (
    (ENDOFTEXT, IM_START, IM_END)
    + tuple(f"<|extra_{i}|>" for i in range(205))
    + ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
)


def read_ranks(path: Path) -> dict[bytes, int]:
    """qwen.tiktoken -> {token bytes: rank}, as tokenization_qwen.py's _load_tiktoken_bpe."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise CheckpointError(
                f"{path.name} line {n} is not 'base64-token rank'", hint="re-download the model"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(
            f"{path.name}: the ranks are not 0..{len(ranks) - 1}, each once", hint="re-download the model"
        )
    return ranks


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of a token into two tokens, ranked by the whole token: tiktoken merges the
    adjacent pair whose concatenation has the lowest rank, whichever split it comes from."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], a, b))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def backend_from_tiktoken(path: Path):
    """A `tokenizers.Tokenizer` equal to tokenization_qwen.py's tiktoken Encoding."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = read_ranks(path)
    chars = byte_level_chars()
    to_str = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # ids follow the ranks, in the published order (add_special_tokens appends)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    first = tok.token_to_id(SPECIAL_TOKENS[0])
    if first != len(ranks):
        raise CheckpointError(f"{path.name}: a special token is also an ordinary token")
    return tok


# What tokenizer_config.json leaves out for a Qwen-VL folder: <|im_end|> ends a chat turn
# (<|endoftext|>, generation_config.json's eos, ends a text).
TOKEN_NAMES = {"eos_token": IM_END, "pad_token": ENDOFTEXT}


def vocabulary(folder: Path):
    """The family's vocabulary for `Tokenizer.from_dir`: qwen.tiktoken converted once, in
    memory, and the special-token names the published tokenizer implies."""
    path = folder / TIKTOKEN_FILE
    if not path.is_file():
        raise CheckpointError(f"missing tokenizer file in {folder}: {TIKTOKEN_FILE} (Qwen-VL's vocabulary)")
    return backend_from_tiktoken(path), dict(TOKEN_NAMES)
