"""How Qwen2-VL checkpoints name their tensors.

The hub repos (transformers 4.45): `visual.*` (the tower and `visual.merger.*`), `model.*`
(the decoder), `lm_head`. transformers 5 in memory and in what it saves: `model.visual.*`,
`model.language_model.*`, `lm_head`. The merger is our `projector`; the tower keeps the
checkpoints' names (fused `attn.qkv`) under `vision.`.
"""

from __future__ import annotations

from vlmcli.families.renames import Renames, prefixes

weight_name = Renames(
    (r"^(?:model\.)?visual\.merger\.", "projector."),
    (r"^(?:model\.)?visual\.", "vision."),
    (r"^lm_head\.", "decoder.lm_head."),
    (r"^model\.language_model\.", "decoder."),
    (r"^model\.", "decoder."),
)

keep_dense = prefixes("vision.", "projector.", "decoder.lm_head")

HF_SKIP_MODULES = ("model.visual", "visual", "lm_head")
