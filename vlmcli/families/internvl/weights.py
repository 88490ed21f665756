"""How InternVL checkpoints name their tensors, and which layers stay unquantized.

The -hf repos (and transformers 5 in memory) use `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*` and `lm_head`; transformers'
llava-style legacy names (`vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head`) are read too. Our vision tower and
projector keep transformers' module names under `vision.` / `projector.`, so every rule is a
prefix. The original OpenGVLab repos (`vision_model.*`, `mlp1.*`, fused `attn.qkv`) are a
different layout, run only through their remote code, and are not read.
"""

from __future__ import annotations

from vlmcli.families.renames import Renames, prefixes

weight_name = Renames(
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "decoder."),
    (r"^(?:model\.)?vision_tower\.", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
)

# The vision tower, the projector and lm_head stay 16-bit unless asked (as for LLaVA).
keep_dense = prefixes("vision.", "projector.", "decoder.lm_head")

# transformers' names for those layers when it loads a quantized checkpoint we wrote:
# prefixes of the in-memory names (5.x) and substrings of the saved ones (4.x).
HF_SKIP_MODULES = ("model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector")
