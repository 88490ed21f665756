"""A static key/value cache: preallocated once, written in place, never reallocated.

Fixed buffers keep memory flat through a long generation (no torch.cat per token) and give
a decode step fixed-size storage and fixed shapes, which is what `torch.compile` without
recompilation and CUDA graph capture need: the slot a token is written to is a tensor
(`index_copy_`), not a Python int baked into the graph.

Writing and reading are separate: `write` stores keys and values and returns nothing;
attention reads `keys(layer, length)` / `values(layer, length)`, the first `length` slots
(eager code knows the length on the host and reads no more than it needs) or the whole
buffer under a mask (the compiled step, so that its shapes never change).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def write(self, layer: int, slots: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv, T, hd) at cache slots `slots` of `layer`: an int start (slots
        start..start+T-1), a LongTensor (T,) of slots, or (B, T), one row of slots per row."""
        if isinstance(slots, int):
            end = slots + k.shape[2]
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
            self.k[layer, :, :, slots:end] = k
            self.v[layer, :, :, slots:end] = v
        elif slots.dim() == 2:
            # (B, T): each row at its own slots (a batch of sequences of different lengths)
            index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        else:
            # in place at tensor indices: one graph serves every step
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)

    def view(self, rows: slice = slice(None), length: int | None = None) -> "KVCache":
        """A cache over rows `rows` and the first `length` slots of this one, sharing its
        memory (writes land here): a batched cache's row for one sequence's prefill, or the
        rows and slots a batched step needs."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[:, rows, :, :length], persistent=False)
        view.register_buffer("v", self.v[:, rows, :, :length], persistent=False)
        view.max_len = view.k.shape[3]
        return view

    def keys(self, layer: int, length: int | None = None) -> torch.Tensor:
        """(B, n_kv, length or max_len, hd): a view, no copy."""
        return self.k[layer, :, :, :length] if length is not None else self.k[layer]

    def values(self, layer: int, length: int | None = None) -> torch.Tensor:
        return self.v[layer, :, :, :length] if length is not None else self.v[layer]
