"""How Llama 3.2 Vision checkpoints name their tensors, and which layers stay unquantized.

The meta-llama hub repos (transformers 4.45): `vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*` (every layer at its own index, cross-attention ones included) and
`language_model.lm_head`. transformers 5 saves `model.vision_model.*`,
`model.multi_modal_projector.*`, `model.language_model.*` and `lm_head`. Our tree keeps the
checkpoints' names below those prefixes (decoder.layers.{i} for both kinds of layer).
"""

from __future__ import annotations

from vlmcli.families.renames import Renames, prefixes

weight_name = Renames(
    (r"^(?:model\.)?vision_model\.", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "decoder."),
)

# The vision tower, the projector and lm_head stay 16-bit unless asked (the cross-attention
# layers are decoder layers, quantized like the rest of it).
keep_dense = prefixes("vision.", "projector", "decoder.lm_head")

# transformers 5 matches from the start of the in-memory name or as a suffix; 4.x as a substring.
HF_SKIP_MODULES = ("model.vision_model", "vision_model", "model.multi_modal_projector", "multi_modal_projector", "lm_head")
