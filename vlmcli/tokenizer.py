"""Text <-> token ids, special tokens, and chat templates.

We read the Hugging Face tokenizer files ourselves and reproduce what `transformers`
(5.x) does with them, without importing it:

* ``tokenizer.json`` is loaded with the `tokenizers` library and used as is (normalizer,
  pre-tokenizer, model, post-processor, decoder). The named special tokens of
  ``tokenizer_config.json`` (and its ``added_tokens_decoder``) are added to it when it
  lacks them, as transformers' tokenizer backend does.
* ``add_bos_token`` / ``add_eos_token`` from ``tokenizer_config.json`` are recorded but,
  like transformers 5.x when a ``tokenizer.json`` is present, they do not change
  encoding: the post-processor stored in ``tokenizer.json`` decides what
  ``add_special_tokens=True`` adds.
* Chat templates are Jinja2 rendered in an immutable sandbox with transformers'
  settings, globals and variables (see :meth:`Tokenizer.render_chat`).

The special-token rule for chat encoding (:meth:`Tokenizer.encode_chat`):

* ``tokenizer.apply_chat_template(..., tokenize=True)`` renders the chat and encodes the
  text with ``add_special_tokens=False``: nothing is added by the post-processor, and the
  special tokens the template writes as text (``<|im_start|>``, ``{{ bos_token }}`` ...)
  are matched as added tokens (so is a special token typed inside a message, since
  ``sanitize_control_tokens`` defaults to False).
* A processor's ``apply_chat_template(..., tokenize=True)`` (LLaVA and the other VLMs)
  passes ``add_special_tokens=False`` only when the rendered prompt starts with the
  tokenizer's ``bos_token``; otherwise it keeps the tokenizer default (True), so the
  post-processor adds its tokens (the ``<s>`` of a Llama/Vicuna LLaVA, whose template
  has no ``bos_token``).

``encode_chat`` follows the processor rule by default (``add_special_tokens=None``), which
gives the same ids as the tokenizer rule whenever the template starts with the BOS token
or the post-processor adds nothing; pass ``add_special_tokens=False`` for the tokenizer
rule exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from functools import lru_cache
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import CheckpointError, VlmError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATES_DIR = "chat_templates"
FAMILY_DEFAULT = "family default"

# The named special tokens transformers knows (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# transformers' `clean_up_tokenization` replacements (applied in this order), and the
# extra one of the WordPiece decoder in `tokenizers`.
_CLEANUP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
_CLEANUP_PATTERNS = tuple(p for p, _ in _CLEANUP_REPLACEMENTS) + (" do not",)

_BYTE_TOKEN_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(VlmError):
    """A chat template refused the conversation (its `raise_exception`) or failed to render."""


# --------------------------------------------------------------------------------------
# Loading helpers


@lru_cache(maxsize=1)
def byte_level_chars() -> dict[int, str]:
    """GPT-2's printable character for each byte, the alphabet of byte-level BPE vocabularies
    (`tokenizers`' ByteLevel): how a vocabulary stored as raw bytes (a tiktoken file, a GGUF's
    tokens) is spelled for `tokenizers`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno})",
            hint="the file may be truncated; download it again",
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any, *, special: bool | None = None):
    """A `tokenizers.AddedToken` from a string or a serialized AddedToken dict."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        # transformers: AddedToken(token, special=True); `normalized` defaults to `not special`
        return AddedToken(value, special=True if special is None else special)
    args = {k: value[k] for k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
    if special is not None:
        args["special"] = special
    return AddedToken(**args)


def _select_template(value: Any, source: str) -> str | None:
    """A template from a config value: a string, or a list of {"name", "template"} (or a dict)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    templates: dict[str, Any] = {}
    if isinstance(value, Mapping):
        templates = dict(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, Mapping) and "name" in item and "template" in item:
                templates[item["name"]] = item["template"]
            else:
                raise CheckpointError(f"{source}: a chat template entry is not a {{name, template}} object")
    else:
        raise CheckpointError(f"{source}: chat_template should be a string or a list of named templates")
    if "default" in templates and isinstance(templates["default"], str):
        return templates["default"]
    raise CheckpointError(
        f"{source} has several chat templates but none named 'default' "
        f"(found: {', '.join(sorted(map(str, templates))) or 'none'})"
    )


def _merge_special_tokens_map(config: dict[str, Any], special_map: Mapping[str, Any]) -> dict[str, Any]:
    """special_tokens_map.json over tokenizer_config.json; extra token lists are merged."""
    config = dict(config)
    for key, value in special_map.items():
        if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
            merged = list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])
            if isinstance(merged, list):
                seen = {_token_content(v) for v in merged}
                merged += [v for v in value if _token_content(v) not in seen]
                config.pop("additional_special_tokens", None)
                config["extra_special_tokens"] = merged
        elif _token_content(value) is not None:
            config[key] = value
    return config


def _decoder_types(node: Any) -> set[str]:
    """Every decoder type in a tokenizer.json "decoder" section (Sequence is walked)."""
    found: set[str] = set()
    if isinstance(node, Mapping):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for child in node.get("decoders") or []:
            found |= _decoder_types(child)
    return found


# --------------------------------------------------------------------------------------
# Template data: what transformers lets a template see


def _plain(value: Any) -> Any:
    """Rebuild template inputs out of plain JSON types; other objects (images, arrays)
    become an inert placeholder naming their type, as transformers does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return _plain(value.item())
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Any) -> list[dict]:
    """transformers' chat normalisation: dict messages, keys with a None value dropped,
    plain data only, and the reasoning text aliased under the names templates read."""
    messages = getattr(messages, "messages", messages)
    if isinstance(messages, Mapping) or not isinstance(messages, (list, tuple)):
        raise ChatTemplateError("a chat is a list of messages ({'role': ..., 'content': ...})")
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    out = []
    for message in messages:
        if is_dataclass(message) and not isinstance(message, type):
            message = {f.name: getattr(message, f.name) for f in fields(message)}
        elif callable(getattr(message, "model_dump", None)):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages should be dicts, got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --------------------------------------------------------------------------------------
# Jinja environment


def _compile_template(source: str, where: str):
    """Compile a chat template with the environment transformers uses."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; we only render it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        # Surfaces through render_chat as a ChatTemplateError with this message
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` without giving the template the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})"
            )

    class TemplateNamespace(jinja2.utils.Namespace):
        # A namespace that refuses dunder (and other underscore) attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"the chat template from {where} is not valid Jinja (line {e.lineno}: {e.message})") from e


# --------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizers` for the ids, jinja2 for the chat template.

    Build it with :meth:`from_dir`. The constructor takes a `tokenizers.Tokenizer` (which it
    completes in place with the config's special tokens) and the parsed tokenizer_config.json.

    `special_tokens` maps names (bos_token, eos_token, pad_token, unk_token, image_token ...)
    to their text; `bos_token_id` / `eos_token_id` / `pad_token_id` are None when unnamed.
    `add_bos_token` / `add_eos_token` echo the config only: as in transformers 5 with a
    tokenizer.json, the post-processor stored there decides what `add_special_tokens=True` adds.
    """

    def __init__(
        self,
        backend,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        template_source: str | None = None,
        path: Path | None = None,
    ):
        from tokenizers import Tokenizer as _Backend

        if not isinstance(backend, _Backend):
            raise TypeError("backend should be a tokenizers.Tokenizer")
        config = dict(config or {})
        self._tok = backend
        self.path = path
        self.config = config
        self.chat_template = chat_template
        self.template_source = template_source
        self._compiled = None

        # Named special tokens: the standard ones, then model-specific `*_token` keys
        # (e.g. image_token) and a dict-valued `extra_special_tokens`, as transformers does.
        special_values: dict[str, Any] = {}
        for key in NAMED_SPECIAL_TOKENS:
            if _token_content(config.get(key)) is not None:
                special_values[key] = config[key]
        for key, value in config.items():
            if key.endswith("_token") and key not in special_values and _token_content(value) is not None:
                special_values[key] = value
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        extra_list: list[Any] = []
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                if _token_content(value) is not None:
                    special_values[key] = value
        elif isinstance(extra, (list, tuple)):
            extra_list = [v for v in extra if _token_content(v) is not None]
        self.special_tokens: dict[str, str] = {k: _token_content(v) for k, v in special_values.items()}

        # Like transformers' tokenizer backend: re-add the added tokens (the config's
        # added_tokens_decoder, else tokenizer.json's own), marking the named special tokens
        # special, then add the named/extra special tokens the backend does not have yet.
        named_contents = set(self.special_tokens.values())
        decoder_cfg = config.get("added_tokens_decoder")
        if isinstance(decoder_cfg, Mapping):
            entries = [v for _, v in sorted(decoder_cfg.items(), key=lambda kv: int(kv[0]))]
        else:
            entries = [
                {"content": t.content, "single_word": t.single_word, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "special": t.special}
                for _, t in sorted(self._tok.get_added_tokens_decoder().items())
            ]
        to_add = []
        for value in entries:
            if _token_content(value) is None:
                continue
            token = _added_token(value)
            if not token.special and token.content in named_contents:
                token = _added_token(value, special=True)
            to_add.append(token)
        existing = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        queued = {t.content for t in to_add}
        for value in list(special_values.values()) + extra_list:
            content = _token_content(value)
            if content not in existing and content not in queued:
                to_add.append(_added_token(value, special=True))
                queued.add(content)
        if to_add:
            self._tok.add_tokens(to_add)
        if config.get("split_special_tokens"):
            self._tok.encode_special_tokens = True

        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))

        decoder_types: set[str] = set()
        if self._tok.decoder is not None:
            try:
                decoder_types = _decoder_types(json.loads(self._tok.decoder.__getstate__()))
            except (TypeError, ValueError):  # pragma: no cover - a decoder always serializes
                pass
        model_type = type(self._tok.model).__name__
        cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        if model_type == "BPE" and not config.get(
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False
        ):
            cleanup = False  # transformers 5 ignores it for BPE (it corrupts the text)
        self._cleanup = cleanup
        # Decoded text may change at its end while more tokens come: note what the stream must hold back
        self._holdback_cleanup = cleanup or "WordPiece" in decoder_types
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ---- construction

    @classmethod
    def from_dir(
        cls, path: str | Path, default_chat_template: str | None = None, vocabulary: tuple[Any, dict] | None = None
    ) -> Tokenizer:
        """Load the tokenizer files of a Hugging Face model folder.

        ``tokenizer.json`` is required, unless the model family read its vocabulary from a
        format of its own: ``vocabulary`` is then (a `tokenizers.Tokenizer`, the defaults of
        the tokenizer config it implies), e.g. Qwen-VL's tiktoken file. The chat template comes from, first found:
        ``chat_template.jinja``, ``chat_templates/default.jinja``, ``chat_template.json``,
        ``tokenizer_config.json``'s ``chat_template``, then ``default_chat_template``
        (``template_source`` is then ``"family default"``).
        """
        from tokenizers import Tokenizer as _Backend

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer folder {path} does not exist or is not a folder")
        tok_file = path / TOKENIZER_FILE
        defaults: dict[str, Any] = {}
        if vocabulary is not None:
            backend, defaults = vocabulary[0], dict(vocabulary[1])
        elif not tok_file.is_file():
            present = [n for n in ("tokenizer.model", "vocab.json", "merges.txt", "tekken.json") if (path / n).exists()]
            hint = (
                f"found only {', '.join(present)}; this tool reads the fast-tokenizer format (tokenizer.json), "
                "which `transformers` writes with AutoTokenizer.from_pretrained(...).save_pretrained(...)"
                if present
                else "the model folder is incomplete; download it again"
            )
            raise CheckpointError(f"missing tokenizer file in {path}: {TOKENIZER_FILE}", hint=hint)
        else:
            try:
                backend = _Backend.from_file(str(tok_file))
            except Exception as e:
                raise CheckpointError(
                    f"{tok_file} is not a tokenizer the `tokenizers` library can read ({e})",
                    hint="the file may be truncated; download it again",
                ) from e

        config: dict[str, Any] = defaults
        config_file = path / TOKENIZER_CONFIG_FILE
        if config_file.is_file():
            loaded = _read_json(config_file)
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{config_file} should hold a JSON object")
            config = {**defaults, **loaded}

        # Old checkpoints: without an added_tokens_decoder in the config, transformers also
        # reads special_tokens_map.json, whose entries win over the config's.
        map_file = path / SPECIAL_TOKENS_MAP_FILE
        if "added_tokens_decoder" not in config and map_file.is_file():
            special_map = _read_json(map_file)
            if isinstance(special_map, dict):
                config = _merge_special_tokens_map(config, special_map)

        template, source = None, None
        if (path / CHAT_TEMPLATE_JINJA).is_file():
            template, source = _read_text(path / CHAT_TEMPLATE_JINJA), CHAT_TEMPLATE_JINJA
        elif (path / CHAT_TEMPLATES_DIR / "default.jinja").is_file():
            template = _read_text(path / CHAT_TEMPLATES_DIR / "default.jinja")
            source = f"{CHAT_TEMPLATES_DIR}/default.jinja"
        elif (path / CHAT_TEMPLATE_JSON).is_file():
            data = _read_json(path / CHAT_TEMPLATE_JSON)
            if not isinstance(data, Mapping) or "chat_template" not in data:
                raise CheckpointError(f"{path / CHAT_TEMPLATE_JSON} has no 'chat_template' entry")
            template, source = _select_template(data["chat_template"], CHAT_TEMPLATE_JSON), CHAT_TEMPLATE_JSON
        elif config.get("chat_template") is not None:
            template = _select_template(config["chat_template"], TOKENIZER_CONFIG_FILE)
            source = TOKENIZER_CONFIG_FILE
        if template is None and default_chat_template is not None:
            template, source = default_chat_template, FAMILY_DEFAULT

        return cls(
            backend,
            config,
            chat_template=template,
            template_source=source,
            path=path,
        )

    # ---- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        return None if content is None else self._tok.token_to_id(content)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def all_special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (what decode skips)."""
        return set(self._special_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # ---- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added tokens written in the text are matched; with
        `add_special_tokens` the post-processor of tokenizer.json adds its tokens (BOS ...)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def _cleanup_text(self, text: str) -> str:
        for old, new in _CLEANUP_REPLACEMENTS:
            text = text.replace(old, new)
        return text

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (transformers' `decode`; special tokens skipped by default)."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return self._cleanup_text(text) if self._cleanup else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat

    def _template(self):
        if self.chat_template is None:
            where = f" in {self.path}" if self.path is not None else ""
            raise CheckpointError(
                f"no chat template found{where}: looked for {CHAT_TEMPLATE_JINJA}, {CHAT_TEMPLATE_JSON} "
                f"and 'chat_template' in {TOKENIZER_CONFIG_FILE}"
            )
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template, self.template_source or "the caller")
        return self._compiled

    def render_chat(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """The chat as text, rendered like transformers' `apply_chat_template(tokenize=False)`.

        The template sees `messages`, `tools`, `documents`, `add_generation_prompt`, every
        named special token as a string (`bos_token`, `eos_token`, `pad_token`, `unk_token`,
        model-specific ones such as `image_token`), and `extra` (which overrides them).
        """
        import jinja2

        template = self._template()
        chat = _normalize_messages(messages)
        extra = _plain(extra)
        tools = extra.pop("tools", None)
        documents = extra.pop("documents", None)
        variables = {**self.special_tokens, **extra}
        try:
            return template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            message = getattr(e, "message", None) or str(e)
            raise ChatTemplateError(f"chat template ({self.template_source or 'given'}): {message}") from e

    def encode_chat(
        self,
        messages,
        add_generation_prompt: bool = True,
        *,
        add_special_tokens: bool | None = None,
        **extra,
    ) -> list[int]:
        """Ids of the rendered chat.

        `add_special_tokens=None` applies transformers' processor rule: special tokens are
        added (by the post-processor) unless the rendered text starts with `bos_token`.
        `add_special_tokens=False` is `tokenizer.apply_chat_template(tokenize=True)` exactly.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        if add_special_tokens is None:
            bos = self.bos_token
            add_special_tokens = not (bos is not None and text.startswith(bos))
        return self.encode(text, add_special_tokens=add_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens}, "
            f"template_source={self.template_source!r})"
        )


# --------------------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Incremental detokenisation: `push` ids one at a time and get the newly final text.

    The concatenation of every `push` and the final `flush` equals
    `tokenizer.decode(all_ids, skip_special_tokens)`. Each push decodes a small window: the
    tokens of the last emitted step (the prefix, which gives decoders their left context, so
    Metaspace/SentencePiece leading-space stripping happens inside it) plus the new ones,
    and emits the difference. Text is held back while it may still change: a trailing
    U+FFFD (incomplete UTF-8), a run of byte-fallback tokens (`<0xNN>`, which the decoder
    turns into text only as a whole), and, when the tokenizer cleans up spaces, a trailing
    partial clean-up pattern such as " " before a possible ".".
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the ids decode keeps (skipped specials and unknown ids dropped)
        self._start = 0  # window start: first id of the prefix
        self._read = 0  # first id whose text is not fully emitted
        self._prefix_text = ""  # decode(ids[start:read])
        self._tail_emitted = ""  # text of ids[read:] emitted so far
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _holdback(self, text: str) -> str:
        """The part of `text` (a tail) that can no longer change."""
        end = len(text)
        while end and text[end - 1] == "\ufffd":
            end -= 1
        if self._tokenizer._holdback_cleanup:
            # Hold back a trailing partial clean-up pattern (" ", " n", " '" ...), repeatedly:
            # one replacement can complete another (" n ' t" -> " n't" -> "n't")
            longest = max(len(p) for p in _CLEANUP_PATTERNS)
            held = True
            while held and end:
                held = False
                for k in range(min(longest - 1, end), 0, -1):
                    suffix = text[end - k : end]
                    if suffix[0] == " " and any(p.startswith(suffix) and p != suffix for p in _CLEANUP_PATTERNS):
                        end -= k
                        held = True
                        break
        return text[:end]

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final (often "")."""
        token_id = int(token_id)
        token = self._tokenizer._tok.id_to_token(token_id)
        if token is None or (self._skip and token_id in self._tokenizer._special_ids):
            return ""  # decode drops these, so they change nothing
        self._ids.append(token_id)
        if _BYTE_TOKEN_RE.fullmatch(token):
            return ""  # a byte run decodes as a whole (or as U+FFFD per byte if invalid): wait for its end
        window = self._decode(self._ids[self._start :])
        if not window.startswith(self._prefix_text):
            return ""  # not additive here; flush() settles it with a full decode
        tail = window[len(self._prefix_text) :]
        if not tail.startswith(self._tail_emitted):
            return ""
        safe = self._holdback(tail)
        delta = safe[len(self._tail_emitted) :] if len(safe) > len(self._tail_emitted) else ""
        if delta:
            self._tail_emitted = safe
            self._pieces.append(delta)
        if safe == tail:
            # Everything up to here is final: the new tokens become the next prefix
            self._start, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._start : self._read])
            self._tail_emitted = ""
        return delta

    def flush(self) -> str:
        """The rest of the text, once no more ids will come. The decoder is then empty
        and ready for a new sequence."""
        full = self._decode(self._ids)
        # `full` starts with what was emitted (the text held back is exactly what may still
        # change); the rest is what remains
        rest = full[len(self.text) :]
        self.__init__(self._tokenizer, skip_special_tokens=self._skip)
        return rest


__all__ = ["Tokenizer", "StreamDecoder", "ChatTemplateError", "FAMILY_DEFAULT"]
