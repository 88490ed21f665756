"""RoPE variants: our inverse frequencies and cos/sin scaling against transformers'
ROPE_INIT_FUNCTIONS (bit for bit), and config parsing of the old and new spellings."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from vlmcli.config import text_from_hf  # noqa: E402
from vlmcli.errors import UnsupportedModelError  # noqa: E402
from vlmcli.model.rope import RotaryEmbedding, rope_frequencies  # noqa: E402

CASES = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096),
    "yarn-untruncated-betas": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=2048,
                                   beta_fast=16, beta_slow=2, truncate=False),
    "yarn-mscale": dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                        mscale=1.0, mscale_all_dim=0.707),
    "yarn-attention-factor": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=8192,
                                  attention_factor=1.25),
}


def _configs(params, max_pos=32768, theta=500000.0, head_dim=128, heads=32):
    """The same settings as a transformers LlamaConfig and as our TextConfig."""
    hf = transformers.LlamaConfig(
        hidden_size=head_dim * heads, num_attention_heads=heads, max_position_embeddings=max_pos,
        rope_parameters={**params, "rope_theta": theta},
    )
    ours = text_from_hf(hf.to_dict())
    return hf, ours


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_inverse_frequencies_and_scaling_are_transformers(case):
    hf, ours = _configs(CASES[case])
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, None)
    inv, scale = rope_frequencies(ours.rope, ours.head_dim, ours.max_position_embeddings)
    assert torch.equal(inv, ref_inv)
    assert scale == ref_scale


@pytest.mark.parametrize("seq_len", [32769, 40000, 65536, 100000])
def test_dynamic_ntk_past_the_trained_length(seq_len):
    hf, ours = _configs(CASES["dynamic"])
    # transformers recomputes in the forward pass with seq_len = max(position_ids) + 1, a tensor
    ref_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, None, seq_len=torch.tensor(seq_len))
    inv, _ = rope_frequencies(ours.rope, ours.head_dim, ours.max_position_embeddings, seq_len=seq_len)
    assert torch.equal(inv, ref_inv)
    assert ours.context_length == 2 * 32768


@pytest.mark.parametrize("case", ["default", "yarn", "llama3"])
def test_cos_sin_tables_are_transformers(case):
    params = CASES.get(case, dict(rope_type="default"))
    hf, ours = _configs(params, head_dim=64, heads=4)
    ref = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf)
    positions = torch.arange(3000, 3040)[None]
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.float32), positions)
    rope = RotaryEmbedding(ours.rope, ours.head_dim, ours.max_position_embeddings)
    rope(0, 10, torch.float32)  # a first, short table that must grow
    cos, sin = rope(3000, 40, torch.float32)
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])


def test_legacy_rope_scaling_spellings():
    # 4.x configs: rope_theta at the top, rope_scaling with "type"
    cfg = {"model_type": "llama", "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}
    text = text_from_hf(cfg)
    assert (text.rope.rope_type, text.rope.theta, text.rope.get("factor")) == ("linear", 1e6, 2.0)
    assert text.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # llama3 without original_max_position_embeddings falls back to max_position_embeddings
    cfg = {"model_type": "llama", "max_position_embeddings": 4096,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    assert text_from_hf(cfg).rope.get("original_max_position_embeddings") == 4096
    # plain RoPE says so either way
    assert text_from_hf({"model_type": "qwen2", "rope_scaling": None}).rope_scaling is None


def test_unsupported_rope_type_names_the_supported_ones():
    cfg = {"model_type": "llama", "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match="longrope.*supported: default, dynamic, linear, llama3, yarn"):
        text_from_hf(cfg)
