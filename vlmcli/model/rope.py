"""Rotary position embeddings: the inverse frequencies and the cos/sin scaling of each RoPE
variant found in Llama-family configs.

    default  theta ** (-2i / d)
    linear   default / factor                                   (position interpolation)
    dynamic  default, with theta raised once the sequence outgrows max_position_embeddings
    yarn     a per-frequency blend of interpolation and extrapolation, cos/sin scaled up
    llama3   low frequencies / factor, high ones kept, a smooth ramp between

Each function repeats transformers' modeling_rope_utils arithmetic step for step (the same
float32 tensors, the same Python floats, the same order of operations), so our tables are
bit-identical to the reference and greedy decoding cannot drift apart.
"""

from __future__ import annotations

import math

import torch

from vlmcli.config import RopeConfig


def _exponents(dim: int, device=None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def _default(rope: RopeConfig, dim: int, device) -> tuple[torch.Tensor, float]:
    return 1.0 / (rope.theta ** _exponents(dim, device)), 1.0


def _linear(rope: RopeConfig, dim: int, device) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _default(rope, dim, device)
    inv_freq /= rope.get("factor")
    return inv_freq, 1.0


def _dynamic(
    rope: RopeConfig, dim: int, device, max_position_embeddings: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling: theta grows with the sequence length past the trained length.

    At load time (seq_len None) this is plain RoPE. transformers recomputes it inside the
    forward pass with seq_len as an int64 tensor, so that arithmetic runs in float32; here too."""
    factor = rope.get("factor")
    base = rope.theta
    if seq_len is None:
        seq = max_position_embeddings
    else:
        seq = torch.tensor(seq_len, dtype=torch.int64)
        seq = torch.maximum(seq, torch.tensor(max_position_embeddings, dtype=seq.dtype))
    base = base * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim, device)), 1.0


def _yarn(rope: RopeConfig, dim: int, device, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    factor = rope.get("factor")
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    original = rope.get("original_max_position_embeddings")
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _llama3(rope: RopeConfig, dim: int, device) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _default(rope, dim, device)
    factor = rope.get("factor")
    low_freq_factor = rope.get("low_freq_factor")
    high_freq_factor = rope.get("high_freq_factor")
    old_context_len = rope.get("original_max_position_embeddings")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are interpolated, short ones kept
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama), 1.0


def rope_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int | None = None, device=None
) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) float32, attention_scaling) for a sequence of `seq_len`
    positions (only dynamic scaling depends on it; None means the trained length)."""
    kind = rope.rope_type
    if kind == "default":
        return _default(rope, head_dim, device)
    if kind == "linear":
        return _linear(rope, head_dim, device)
    if kind == "dynamic":
        return _dynamic(rope, head_dim, device, max_position_embeddings, seq_len)
    if kind == "yarn":
        return _yarn(rope, head_dim, device, max_position_embeddings)
    if kind == "llama3":
        return _llama3(rope, head_dim, device)
    raise ValueError(f"unknown RoPE type {kind!r}")


def cos_sin(
    inv_freq: torch.Tensor, attention_scaling: float, start: int, length: int
) -> tuple[torch.Tensor, float]:
    """cos/sin tables (length, head_dim) for positions start..start+length-1, in float32."""
    positions = torch.arange(start, start + length, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)  # halves repeated, as rotate_half expects
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for any run of positions. Tables are built on first use and grown by doubling
    (a 128k-position model does not pay for 128k rows up front); dynamic NTK scaling past the
    trained length is computed per call, as transformers does in its forward pass."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int, device=None):
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        inv_freq, scaling = rope_frequencies(rope, head_dim, max_position_embeddings, device=device)
        self.attention_scaling = scaling
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0, head_dim, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim, device=device), persistent=False)

    def _grow(self, length: int) -> None:
        have = self.cos.shape[0]
        new = min(max(length, 2 * have, 256), max(length, self.max_position_embeddings))
        cos, sin = cos_sin(self.inv_freq, self.attention_scaling, have, new - have)
        self.cos = torch.cat([self.cos, cos])
        self.sin = torch.cat([self.sin, sin])

    def reserve(self, length: int) -> None:
        """Build the tables for positions 0..length-1 now, so that `at` never grows them (a
        compiled step must not change a buffer's size)."""
        if length > self.cos.shape[0]:
            self._grow(length)

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T, head_dim) for a LongTensor of positions (T,), from the tables (see
        `reserve`): the same rows `forward` slices, gathered by index."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)

    def at_mrope(
        self, positions: torch.Tensor, dtype: torch.dtype, section: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multimodal RoPE (Qwen2-VL): positions (3, T) (temporal, height, width streams) ->
        cos/sin (T, head_dim). The frequencies are cut into `section` runs (sum head_dim/2)
        taking streams 0, 1, 2, 0, 1, 2 ... in turn, the second half as the first, as
        transformers' recomposition_frequencies: each entry is the table's row of its
        stream's position, so the values are the 1-D tables' bits."""
        T = positions.shape[-1]
        sel = _mrope_streams(tuple(section), self.head_dim, positions.device)
        idx = sel.view(1, 1, -1).expand(1, T, -1)
        cos = self.cos[positions].gather(0, idx)[0]
        sin = self.sin[positions].gather(0, idx)[0]
        return cos.to(dtype), sin.to(dtype)

    def forward(self, pos: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        end = pos + length
        if self.rope.rope_type == "dynamic" and end > self.max_position_embeddings:
            inv_freq, scaling = rope_frequencies(
                self.rope, self.head_dim, self.max_position_embeddings, seq_len=end, device=self.inv_freq.device
            )
            cos, sin = cos_sin(inv_freq, scaling, pos, length)
            return cos.to(dtype), sin.to(dtype)
        if end > self.cos.shape[0]:
            self._grow(end)
        return self.cos[pos:end].to(dtype), self.sin[pos:end].to(dtype)


_STREAMS: dict = {}


def _mrope_streams(section: tuple[int, ...], head_dim: int, device) -> torch.Tensor:
    """The position stream (0 temporal, 1 height, 2 width) each of head_dim entries uses."""
    key = (section, head_dim, str(device))
    if key not in _STREAMS:
        if 2 * sum(section) != head_dim:
            raise ValueError(f"mrope_section {list(section)} does not cover head_dim {head_dim} / 2")
        half = [i % 3 for i, n in enumerate(section) for _ in range(n)]
        _STREAMS[key] = torch.tensor(half + half, dtype=torch.long, device=device)
    return _STREAMS[key]
