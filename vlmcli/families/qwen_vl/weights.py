"""How Qwen-VL checkpoints name their tensors (the hub repos' remote-code layout).

    transformer.wte                      decoder.embed_tokens
    transformer.h.N.ln_1 / ln_2          decoder.layers.N.input_layernorm / post_attention_layernorm
    transformer.h.N.attn.c_attn          decoder.layers.N.self_attn.qkv_proj (q, k, v side by side,
                                         kept fused: the shared Attention takes one such layer)
    transformer.h.N.attn.c_proj          decoder.layers.N.self_attn.o_proj
    transformer.h.N.mlp.w2 / w1 / c_proj decoder.layers.N.mlp.gate_proj / up_proj / down_proj
                                         (QWenMLP: a1 * silu(a2), a1 = w1(x), a2 = w2(x), so w2
                                         is the gate)
    transformer.ln_f                     decoder.norm
    lm_head                              decoder.lm_head
    transformer.visual.attn_pool / ln_post / proj   projector.* (the resampler and what follows it)
    transformer.visual.*                 vision.* (visual.py's names)
"""

from __future__ import annotations

from vlmcli.families.renames import Renames, prefixes

weight_name = Renames(
    (r"^transformer\.visual\.(attn_pool|ln_post|proj)\b", r"projector.\1"),
    (r"^transformer\.visual\.", "vision."),
    (r"^transformer\.wte\.", "decoder.embed_tokens."),
    (r"^transformer\.ln_f\.", "decoder.norm."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"decoder.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_2\.", r"decoder.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.attn\.c_attn\.", r"decoder.layers.\1.self_attn.qkv_proj."),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"decoder.layers.\1.self_attn.o_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.w2\.", r"decoder.layers.\1.mlp.gate_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.w1\.", r"decoder.layers.\1.mlp.up_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"decoder.layers.\1.mlp.down_proj."),
    (r"^lm_head\.", "decoder.lm_head."),
)

# The vision tower, the resampler and lm_head stay 16-bit unless asked (as for LLaVA).
keep_dense = prefixes("vision.", "projector.", "decoder.lm_head")

# Remote-code checkpoints are not loaded by transformers' own classes; these are the
# substrings of the saved names a quantized checkpoint we wrote keeps dense.
HF_SKIP_MODULES = ("transformer.visual", "lm_head")
