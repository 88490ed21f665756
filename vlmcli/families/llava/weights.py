"""How LLaVA checkpoints name their tensors, and which layers stay unquantized."""

from __future__ import annotations

from vlmcli.families.renames import Renames, prefixes

# Checkpoints name the same tensors several ways: llava-hf's hub repos use
# `language_model.model.*` / `language_model.lm_head` / `vision_tower.vision_model.*` (and
# `image_newline` at the top level for NeXT and OneVision), while transformers 5 (in memory,
# and in some saved files) uses `model.language_model.*`, `lm_head`, `model.vision_tower.*`
# without `vision_model`, `model.image_newline`. All map onto our module tree; the vision
# towers' post_layernorm and SigLIP's pooling `head` map to names we do not have, so they
# are reported as unused.
weight_name = Renames(
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "decoder."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^(?:model\.)?image_newline$", "image_newline"),
)

# The vision tower, the projector and lm_head stay 16-bit (fp32 on the CPU) unless asked:
# a small part of a 7B model, and the parts most sensitive to rounding.
keep_dense = prefixes("vision.", "projector.", "decoder.lm_head")

# The same layers as transformers must skip when it loads a quantized checkpoint we wrote,
# in the two naming schemes its versions match against: transformers 5 matches a pattern
# from the start of the in-memory module name (`model.vision_tower.encoder...`) or as its
# suffix; transformers 4 looked for the pattern as a substring (`vision_tower.vision_model...`).
HF_SKIP_MODULES = ("model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector")
