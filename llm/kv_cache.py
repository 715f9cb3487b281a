"""Key/value cache for incremental decoding.

Each layer's keys (after RoPE) and values are written at positions [length, length + s) of
preallocated (b h_kv max_len d) buffers; attention then reads [0, length + s). `Transformer.forward`
advances `length` once all layers have written. Beam search moves rows between steps with `reorder`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if min(num_layers, batch, num_kv_heads, max_len, head_dim) <= 0:
            raise ValueError("KVCache sizes must all be positive")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.v = torch.zeros_like(self.k)
        self.num_layers, self.batch, self.max_len = num_layers, batch, max_len
        self.length = 0
        # the merged inference weights llm.fast.decode_step builds on the first decode step into this
        # cache: they live as long as the cache (one generation call)
        self.decode_weights = None

    def check_room(self, batch: int, new: int) -> None:
        if batch != self.batch:
            raise ValueError(f"batch size {batch} does not match the KV cache's {self.batch}")
        if self.length + new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {new} tokens exceed max_len {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b h_kv s d) after the current length; return all keys/values so far."""
        n = k.shape[-2]
        kl, vl = self.k[layer], self.v[layer]
        # narrow + copy_ into the preallocated buffer: fewer ops than slice assignment via __setitem__
        kl.narrow(2, self.length, n).copy_(k)
        vl.narrow(2, self.length, n).copy_(v)
        return kl.narrow(2, 0, self.length + n), vl.narrow(2, 0, self.length + n)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def reorder(self, indices: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes old row indices[i] (b_new,), so each beam keeps the keys
        and values of the beam it extends; the batch may grow (the first step fans out from the prompt)."""
        indices = indices.to(self.k.device)
        self.k = self.k.index_select(1, indices)
        self.v = self.v.index_select(1, indices)
        self.batch = int(indices.numel())

    def __len__(self) -> int:
        return self.length
