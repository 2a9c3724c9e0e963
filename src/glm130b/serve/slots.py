"""The tensors of continuous batching: a KV cache whose rows are independent sequences.

Row b of the cache holds one request's sequence in slots 0..n_b-1, exactly as if it ran alone:
its prompt is prefilled alone into that row, and each decode step writes every row's new key at
that row's own slot (`RowSlotCache.store` with slots [B, 1]). The mask lets row b see its slots
0..n_b and nothing else, so a row never reads another request's keys. A step attends over the
first slots up to the longest row's (rounded up), not the whole cache: short sequences in a long
cache do not pay for its empty slots.
"""

from __future__ import annotations

import torch

from glm130b.generate.decode import prefill
from glm130b.model.glm import GLM
from glm130b.model.kv_cache import KVCache
from glm130b.tokenizer.specials import SpecialTokens

# Attention windows are rounded up to a multiple of this many slots, so that a sequence growing a
# token a step changes the attention's shape once every 16 steps, not at each (kernels and their
# caches are chosen per shape).
WINDOW_GRANULE = 16


class RowSlotCache(KVCache):
    """KVCache [rows, H, T, D] whose decode writes go to one slot per row (`slots` [B, S]); such a
    step attends over the first `window` slots (decode_rows sets it)."""

    window: int | None = None

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if slots is None or slots.dim() == 1:  # the base class's modes (every row at the same slots)
            return super().store(layer, k, v, slots)
        B, H, S, D = k.shape
        index = slots.view(B, 1, S, 1).expand(B, H, S, D)
        keys, values = self.keys[layer][:B], self.values[layer][:B]  # views: writes land in the buffers
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        return keys[:, :, : self.window], values[:, :, : self.window]

    def row(self, b: int) -> KVCache:
        """A batch-1 KVCache viewing row b (for prefilling one request in place)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[b : b + 1] for k in self.keys]
        view.values = [v[b : b + 1] for v in self.values]
        view.length, view.max_length = 0, self.max_length
        return view


def prefill_rows(
    model: GLM, cache: RowSlotCache, rows: list[int], contexts: list[list[int]], specials: SpecialTokens
) -> torch.Tensor:
    """Run contexts (ids ending in <sop>) into cache rows `rows`, slots 0..len-1 of each; logits
    [k, V] fp32 at each <sop>. One context is written in place; several run as one right-padded
    batch into a scratch cache whose rows are then copied (their pad slots are overwritten by
    generated tokens before any row can see them)."""
    with torch.no_grad():
        if len(rows) == 1:
            return prefill(model, cache.row(rows[0]), contexts, specials)
        keys = cache.keys[0]
        length = max(len(c) for c in contexts)
        scratch = KVCache(model.config, len(rows), length, dtype=keys.dtype, device=keys.device)
        logits = prefill(model, scratch, contexts, specials)
        index = torch.tensor(rows, device=keys.device)
        for layer in range(len(cache.keys)):
            cache.keys[layer][index, :, :length] = scratch.keys[layer]
            cache.values[layer][index, :, :length] = scratch.values[layer]
        return logits


def _round_up(slots: int) -> int:
    return -(-slots // WINDOW_GRANULE) * WINDOW_GRANULE


def decode_rows(
    model: GLM,
    cache: RowSlotCache,
    tokens: list[int],
    positions: list,
    slots: list[int],
    full_window: bool = False,
) -> torch.Tensor:
    """One token per row of rows 0..B-1: row b feeds tokens[b] at position positions[b] (an int,
    or a pair for 2-D positions) into slot slots[b] and sees slots 0..slots[b]. Logits [B, V] fp32.
    full_window: attend over every slot of the cache, so that no row's arithmetic depends on the
    others' lengths (the engine's batch_invariant mode)."""
    device = cache.keys[0].device
    B = len(tokens)
    slot = torch.tensor(slots, device=device).view(B, 1)
    position = torch.tensor(positions, device=device).view(B, -1, 1).squeeze(1)  # [B, 1] or [B, 2, 1]
    cache.window = cache.max_length if full_window else min(cache.max_length, _round_up(max(slots) + 1))
    cols = torch.arange(cache.window, device=device)
    mask = (cols.view(1, -1) > slot).view(B, 1, 1, -1)  # [B, 1, 1, T], True = blocked
    with torch.no_grad():
        logits = model(
            torch.tensor(tokens, device=device).view(B, 1),
            position,
            mask,
            kv_cache=cache,
            check_inputs=False,
            cache_slots=slot,
        )
    return logits[:, -1].float()
