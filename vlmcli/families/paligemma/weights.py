"""How PaliGemma checkpoints name their tensors, and which layers stay unquantized.

The google/paligemma* hub repos (written by transformers 4.4x) use `language_model.model.*`,
`vision_tower.vision_model.*` and `multi_modal_projector.linear.*`, and store no lm_head
(tied to the embeddings); transformers 5 saves `vision_tower.*` without `vision_model.`, and
holds `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*` and
`lm_head` in memory. All map onto our module tree. SigLIP's post_layernorm is used here (the
last hidden state); its pooling head is absent from every PaliGemma (vision_use_head false).
"""

from __future__ import annotations

from vlmcli.families.renames import Renames, prefixes

weight_name = Renames(
    (r"^(?:model\.)?language_model\.lm_head\.", "decoder.lm_head."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "decoder."),
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.linear\.", "projector.linear_1."),
)

# As LLaVA: the vision tower, the projector and lm_head stay 16-bit unless asked.
keep_dense = prefixes("vision.", "projector.", "decoder.lm_head")

# transformers 5 matches from the start of the in-memory name or as a suffix; 4.x as a substring.
HF_SKIP_MODULES = ("model.vision_tower", "vision_tower", "model.multi_modal_projector", "multi_modal_projector")
