"""The KV cache of incremental decoding: preallocated keys and values of every layer."""

from __future__ import annotations

import torch

from glm130b.core.errors import InputError
from glm130b.model.config import GLMConfig


class KVCache:
    """Preallocated keys (after rotary) and values of every layer, [B, H, max_length, D] each.

    Two ways to write it:
    - growing (default): a forward with `kv_cache=cache` writes its S new keys at `cache.length` and
      attends over the first `cache.length + S`; the model advances `length` once all layers have run.
    - static slots: a forward with `kv_cache=cache, cache_slots=slots` writes its S new keys at the
      slot indices `slots` [S] (a tensor) and attends over all `max_length` slots, the mask blocking
      the ones not in use. Shapes then never change from one decode step to the next and no Python
      int moves, so the step can be compiled once and replayed as a CUDA graph (glm130b.generate.decode).
    """

    def __init__(
        self,
        config: GLMConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        num_heads: int | None = None,
    ):
        """num_heads: the heads this process computes (a tensor-parallel rank holds a share); default all."""
        if max_length > config.max_sequence_length:
            raise InputError(
                f"KV cache length {max_length} exceeds max_sequence_length "
                f"{config.max_sequence_length}; generate fewer tokens or shorten the prompt"
            )
        shape = (batch_size, num_heads or config.num_attention_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.length = 0
        self.max_length = max_length

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new k, v [B, H, S, D] of `layer`; return the keys and values to attend over
        ([B, H, T, D]: the first length + S, or all max_length slots when `slots` [S] is given)."""
        if slots is not None:
            # In place, so the buffers keep their addresses (what a captured CUDA graph reads).
            self.keys[layer].index_copy_(2, slots, k)
            self.values[layer].index_copy_(2, slots, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (e.g. the parent of each beam), in that order."""
        if index.numel() == self.keys[0].shape[0]:  # same batch size: in place, addresses kept
            for buffer in self.keys + self.values:
                buffer.copy_(buffer.index_select(0, index))
            return
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
