"""nn.Embedding that builds on `meta` without initialising.

The loader builds every model on the meta device and fills it from the checkpoint, so the
random init is thrown away. nn.Embedding's `normal_` has no meta kernel: it runs through
torch._refs, whose first use imports torch._dynamo, 1.4 s of every command's start-up."""

from __future__ import annotations

from torch import nn


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
