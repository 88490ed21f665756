"""The language decoder: a LLaMA-family transformer fed with input embeddings.

    embeddings (B, T, d)  [text tokens with the visual tokens already scattered in]
      -> n blocks: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x))
         attention: RoPE on q and k, grouped-query (n_kv_heads <= n_heads), static KV cache
         mlp: down(act(gate(x)) * up(x))
      -> rmsnorm -> lm_head -> logits (B, T or 1, vocab)

The family members differ in a few switches (see TextConfig):
    Llama    SwiGLU, no biases
    Mistral  + a sliding attention window on every layer
    Qwen2    + biases on q/k/v; optionally a sliding window on the upper layers
    Gemma    GeGLU (GELU-tanh gate), embeddings scaled by sqrt(d_model), RMSNorm by (1 + w),
             head_dim set by the config rather than d_model / n_heads
    Gemma2   + scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped (SDPA cannot
             cap, so those layers attend by an explicit softmax), logits soft-capped,
             "sandwich" norms (each sublayer's output normalised before the residual add:
             post_attention_layernorm, pre_/post_feedforward_layernorm), a sliding window
             on alternate layers
and in RoPE scaling (rope.py).

Parameter names follow Hugging Face Llama checkpoints so the loader maps them by prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmcli.config import TextConfig
from vlmcli.model.activations import activation
from vlmcli.model.embedding import Embedding
from vlmcli.model.kv_cache import KVCache
from vlmcli.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with offset 1 (Gemma) the stored weight is zero-centred."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even for 16-bit activations: the mean of squares overflows fp16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma scales before rounding back to 16 bits, Llama after (transformers#29402)
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class ScaledEmbedding(Embedding):
    """Token embeddings times a constant (Gemma: sqrt(d_model)).

    The scale belongs to the lookup, not to the decoder's input: visual tokens scattered
    over the image placeholders stay unscaled, as in transformers 5."""

    def __init__(self, num_embeddings: int, embedding_dim: int, multiplier: float):
        super().__init__(num_embeddings, embedding_dim)
        self.multiplier = multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # the constant is a float32 tensor rounded to the weights' dtype, as the reference does
        scale = torch.tensor(self.multiplier, dtype=torch.float32, device=self.weight.device)
        return super().forward(ids) * scale.to(self.weight.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin  # x (B, nh, T, hd), cos/sin (T, hd)


def causal_mask(
    pos: int, length: int, device, window: int | None = None, prefix: int = 0
) -> torch.Tensor | None:
    """Boolean mask for `length` queries starting at `pos` over keys 0..pos+length-1; with a
    sliding `window`, query q sees only keys q-window+1..q; with a `prefix` (prefix-LM, as
    PaliGemma), the first `prefix` positions also see each other in both directions, window
    or not (transformers' blockwise overlay is OR-ed onto the sliding causal mask).

    None when SDPA's own handling is exact: the window cuts nothing, no query of this chunk
    lies in a bidirectional prefix, and either one query sees every cached key or a prefill
    from position 0 is plain causal."""
    end = pos + length
    if pos >= prefix and (window is None or end <= window):
        if length == 1 or pos == 0:
            return None
        window = None
    q = torch.arange(pos, end, device=device)[:, None]
    return slot_mask(q, end, device, window, prefix)


def slot_mask(q: torch.Tensor, n_keys: int, device, window: int | None = None, prefix: int = 0) -> torch.Tensor:
    """Boolean (T, n_keys) mask for queries at cache slots `q` (T, 1) over keys 0..n_keys-1:
    causal within `window`, and bidirectional over the first `prefix` slots (all of them,
    even past the window). Built from tensors only, so a compiled step computes it inside
    its graph."""
    k = torch.arange(n_keys, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    if prefix:
        mask |= (k < prefix) & (q < prefix)
    return mask


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, cap: float
) -> torch.Tensor:
    """Attention with soft-capped scores, cap * tanh(q.k * scale / cap) (Gemma2), which SDPA
    cannot do: q (B, nh, Tq, hd), k and v (B, nkv, S, hd), mask (Tq, S) boolean or None
    (causal, queries at the end of the keys). In transformers' eager order, softmax in fp32."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        Tq, S = scores.shape[-2:]
        mask = torch.ones(Tq, S, dtype=torch.bool, device=q.device).tril(S - Tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window_for(layer_index)
        self.scale = cfg.attention_scale  # None: SDPA's 1 / sqrt(head_dim)
        self.softcap = cfg.attn_logit_softcap
        self.attention_dtype: torch.dtype | None = None  # None: the activations' dtype
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)
        self.qkv_proj: nn.Module | None = None  # q, k and v as one product, once fused (fuse_qkv)

    def fuse_qkv(self, qkv: nn.Module) -> None:
        """Replace q_proj, k_proj and v_proj by one layer computing their outputs side by side:
        one product instead of three per step (the loader does this for plain weights)."""
        self.qkv_proj = qkv
        del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.n_kv * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(
        self, x, cos, sin, slots: int | torch.Tensor, cache: KVCache | None, masks: dict, last_only: bool = False
    ) -> torch.Tensor:
        """slots: where this chunk goes in the cache, an int start (eager: keys 0..start+T-1
        are read) or a LongTensor (T,) (the capturable step: the whole cache is read, the
        mask hides what is not written yet). masks: the attention mask per window size, as
        Decoder.forward computes them once for all layers. last_only: keys and values for
        every position (the cache needs them), the output for the last position only."""
        B, T, _ = x.shape
        q, k, v = self._project(x)
        k = apply_rope(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        mask = masks[self.window]
        if last_only and T > 1:
            q, cos, sin = q[:, -1:], cos[-1:], sin[-1:]
            mask = masks[("last", self.window)]
        Tq = q.shape[1]
        q = apply_rope(q.view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)  # (B, nh, Tq, hd)
        if cache is not None:
            cache.write(self.layer_index, slots, k, v)
            n_keys = slots + T if isinstance(slots, int) else None
            k, v = cache.keys(self.layer_index, n_keys), cache.values(self.layer_index, n_keys)  # (B, nkv, S, hd)
        dtype = q.dtype
        if self.attention_dtype is not None and self.attention_dtype != dtype:
            q, k, v = q.to(self.attention_dtype), k.to(self.attention_dtype), v.to(self.attention_dtype)
        if self.softcap is not None:
            scale = self.scale if self.scale is not None else self.head_dim**-0.5
            y = softcapped_attention(q, k, v, mask, scale, self.softcap).to(dtype)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=(mask is None and Tq > 1), enable_gqa=self.n_kv != self.n_heads,
                scale=self.scale,
            ).to(dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one product, once fused

    def fuse_gate_up(self, gate_up: nn.Module) -> None:
        """Replace gate_proj and up_proj by one layer computing both outputs side by side."""
        self.gate_up_proj = gate_up
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    """Llama: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).
    Gemma2 (sandwich norms; the checkpoints' names, so post_attention_layernorm changes
    role): x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))."""

    def __init__(self, cfg: TextConfig, layer_index: int):
        super().__init__()
        self.sandwich = cfg.sandwich_norms
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.mlp = MLP(cfg)

    def forward(
        self, x, cos, sin, slots: int | torch.Tensor, cache: KVCache | None, masks: dict, last_only: bool = False
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, slots, cache, masks, last_only)
        if self.sandwich:
            x = x[:, -h.shape[1] :] + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x[:, -h.shape[1] :] + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.embedding_multiplier != 1.0:
            self.embed_tokens = ScaledEmbedding(cfg.vocab_size, cfg.d_model, cfg.embedding_multiplier)
        else:
            self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None
        # Qwen2-VL's multimodal RoPE: positions (3, T) split head_dim/2 into these runs
        self.mrope_section: tuple[int, ...] | None = None
        self.windows = sorted({layer.self_attn.window for layer in self.layers}, key=lambda w: w or 0)

    def tie_weights(self, head: nn.Module) -> None:
        """Share one matrix between embed_tokens and lm_head. `head`: the lm_head built from
        the stored matrix, perhaps in a backend's own layout (TransposedLinear); the
        embedding looks its rows up in the head's (out, in) view, so the matrix is held once."""
        self.lm_head = head
        self.embed_tokens.weight = nn.Parameter(head.weight, requires_grad=False)

    def setup(self, device, attention_dtype: torch.dtype | None = None) -> None:
        """Build the tables that are computed rather than loaded (after the weights are in).
        attention_dtype: what attention computes in, when a backend wants it to differ from
        the activations' (see backends/cpu.py)."""
        self.rope = RotaryEmbedding(self.cfg.rope, self.cfg.head_dim, self.cfg.max_position_embeddings, device)
        for layer in self.layers:
            layer.self_attn.attention_dtype = attention_dtype

    def new_cache(self, max_len: int | None = None, batch: int = 1) -> KVCache:
        """A cache of `max_len` slots (default: the whole context), allocated once; the RoPE
        tables are built to the same length, so no step ever grows them."""
        w = self.embed_tokens.weight
        max_len = max_len or self.cfg.max_position_embeddings
        if self.rope is not None:
            self.rope.reserve(max_len)
        return KVCache(
            self.cfg.n_layers,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            max_len,
            batch=batch,
            dtype=w.dtype,
            device=w.device,
        )

    def forward(
        self,
        embeds: torch.Tensor,
        slots: int | torch.Tensor,
        cache: KVCache | None,
        last_only: bool = True,
        *,
        positions: torch.Tensor | None = None,
        prefix: int = 0,
    ) -> torch.Tensor:
        """embeds (B, T, d) -> logits (B, 1 or T, vocab).

        slots: the cache slots of the T tokens, an int start (slots start..start+T-1), a
        LongTensor (T,) (the capturable decode step; see Attention.forward), or (B, T), each
        row its own (sequences of a batch at different lengths). positions: the
        RoPE positions, a LongTensor (T,), or (3, T) for multimodal RoPE (mrope_section);
        by default the slots. prefix: the first `prefix`
        slots attend to each other both ways (prefix-LM); 0 is plain causal. Without a
        cache the sequence is attended to on its own (training and scoring)."""
        T = embeds.shape[1]
        device = embeds.device
        # slots (B, T): each row of the batch at its own slots (the server's batched step);
        # positions then are (B, T) too, one row per sequence, never M-RoPE's (3, T)
        per_row = isinstance(slots, torch.Tensor) and slots.dim() == 2
        if isinstance(slots, int) and positions is None:
            cos, sin = self.rope(slots, T, embeds.dtype)
        elif positions is not None and positions.dim() == 2 and not per_row:
            if self.mrope_section is None:
                raise ValueError("3-D RoPE positions need a decoder with mrope_section")
            cos, sin = self.rope.at_mrope(positions, embeds.dtype, self.mrope_section)
        else:
            cos, sin = self.rope.at(slots if positions is None else positions, embeds.dtype)
            if per_row:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        if isinstance(slots, int):
            # Without a cache the keys are just this chunk, whatever its slots.
            start = slots if cache is not None else 0
            masks = {w: causal_mask(start, T, device, w, prefix) for w in self.windows}
            if last_only and T > 1:
                masks.update({("last", w): causal_mask(start + T - 1, 1, device, w, prefix) for w in self.windows})
        else:
            if cache is None:
                raise ValueError("cache slots given as a tensor need a cache")
            q = slots[..., None]  # (T, 1), or (B, T, 1) per row
            masks = {w: slot_mask(q, cache.max_len, device, w, prefix) for w in self.windows}
            if per_row:
                masks = {w: m[:, None] for w, m in masks.items()}  # (B, 1, T, S)
            last_only = False  # one token per step
        x = self.run_layers(embeds, cos, sin, slots, cache, masks, last_only)
        logits = self.lm_head(self.norm(x))
        cap = self.cfg.final_logit_softcap
        if cap is not None:  # Gemma2
            logits = torch.tanh(logits / cap) * cap
        return logits

    def run_layers(self, x, cos, sin, slots, cache: KVCache | None, masks: dict, last_only: bool) -> torch.Tensor:
        """The blocks in order (a decoder with other kinds of layer, Llama 3.2 Vision's
        cross-attention, runs its own sequence here)."""
        # Generation needs only the next-token distribution: the last block (past its keys
        # and values, which the cache keeps) and the head run for the last position alone.
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, slots, cache, masks, last_only=last_only and i == len(self.layers) - 1)
        return x
