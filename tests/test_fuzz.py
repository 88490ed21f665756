"""Property-based tests: whatever bytes, headers, indexes, configs or images a model folder
holds, the loaders raise only our own errors (which the CLI turns into one-line messages),
never a raw exception and never a crash."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.cpu import CpuBackend
from vlmcli.errors import VlmError
from vlmcli.loader import load_model
from vlmcli.preprocess import load_image

FUZZ = settings(
    max_examples=500,  # six properties: 3000 cases per run
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def good(tmp_path_factory, make_llava):
    return make_llava()


def _fresh(good, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(good / name, folder / name)
    return folder


def _load_expecting_our_errors(folder):
    try:
        load_model(folder, CpuBackend())
    except VlmError:
        pass


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_safetensors(good, tmp_path_factory, data):
    folder = _fresh(good, tmp_path_factory)
    (folder / "model.safetensors").write_bytes(data)
    _load_expecting_our_errors(folder)


_dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "XX", ""])
_header_entry = st.fixed_dictionaries(
    {
        "dtype": _dtypes,
        "shape": st.lists(st.integers(min_value=-2, max_value=10**6), max_size=4),
        "data_offsets": st.lists(st.integers(min_value=-5, max_value=10**7), min_size=0, max_size=3),
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=40), _header_entry, max_size=4),
    declared=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    body=st.binary(max_size=256),
)
def test_random_safetensors_headers(good, tmp_path_factory, header, declared, body):
    raw = json.dumps(header).encode()
    size = len(raw) if declared is None else declared
    folder = _fresh(good, tmp_path_factory)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", size) + raw + body)
    _load_expecting_our_errors(folder)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**40), max_value=2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    weight_map=st.one_of(
        _json_values,
        st.dictionaries(
            st.text(max_size=30),
            st.one_of(
                st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd", "", ".", "a/../../b"]),
                _json_values,
            ),
            max_size=4,
        ),
    )
)
def test_random_index_files(good, tmp_path_factory, weight_map):
    folder = _fresh(good, tmp_path_factory)
    shutil.copy(good / "model.safetensors", folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _load_expecting_our_errors(folder)


_CONFIG_PATHS = [
    ("model_type",),
    ("image_token_index",),
    ("vision_feature_layer",),
    ("vision_feature_select_strategy",),
    ("projector_hidden_act",),
    ("vision_config",),
    ("vision_config", "hidden_size"),
    ("vision_config", "patch_size"),
    ("vision_config", "image_size"),
    ("vision_config", "num_attention_heads"),
    ("vision_config", "num_hidden_layers"),
    ("vision_config", "hidden_act"),
    ("text_config",),
    ("text_config", "model_type"),
    ("text_config", "hidden_size"),
    ("text_config", "num_attention_heads"),
    ("text_config", "num_key_value_heads"),
    ("text_config", "head_dim"),
    ("text_config", "vocab_size"),
    ("text_config", "max_position_embeddings"),
    ("text_config", "rope_parameters"),
    ("text_config", "rms_norm_eps"),
    ("text_config", "eos_token_id"),
]


def apply_edits(cfg: dict, edits) -> None:
    """Set each (key path, value) in a config dict, making the dicts on the way."""
    for path, value in edits:
        target = cfg
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = value


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(_CONFIG_PATHS), _json_values), min_size=1, max_size=3))
def test_random_configs(good, tmp_path_factory, edits):
    folder = _fresh(good, tmp_path_factory)
    shutil.copy(good / "model.safetensors", folder / "model.safetensors")
    cfg = json.loads((good / "config.json").read_text())
    apply_edits(cfg, edits)
    (folder / "config.json").write_text(json.dumps(cfg))
    _load_expecting_our_errors(folder)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_image(data):
    try:
        load_image(data)
    except VlmError:
        pass


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0, max_value=10_000))
def test_damaged_png(test_image, cut, flip):
    data = bytearray(test_image.read_bytes())
    data = data[: max(1, len(data) - cut % len(data))]
    data[flip % len(data)] ^= 0x5A
    try:
        load_image(bytes(data))
    except VlmError:
        pass
