"""A FlexAttention block mask from a batch's compact attention form (segment ids + prefix flags).

The same rule as the dense mask (glm130b.model.masks.visibility), evaluated per block by
torch.nn.attention.flex_attention.create_block_mask, so that flex_attention skips the blocks no
query can see (between the segments of a packed sequence, and above the causal diagonal).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from glm130b.model.masks import visibility

# FlexAttention's default tile; a multiple of it keeps the last block whole.
DEFAULT_BLOCK_SIZE = 128


def flex_block_mask(
    segment_ids: torch.Tensor, in_prefix: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """BlockMask [B, 1, L, L] allowing exactly what `visibility` allows. Pad rows see nothing
    (flex_attention returns zeros there, the dense mask lets them see themselves; neither is scored)."""
    B, L = segment_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        # The 0-d indices are lifted to 1-d: dynamo cannot trace `row[..., 0-d tensor]` in
        # flex_attention (data-dependent shape), while `row[..., 1-d tensor]` traces fine.
        return visibility(segment_ids[b], in_prefix[b], q_idx.unsqueeze(0), kv_idx.unsqueeze(0)).squeeze(0)

    return create_block_mask(mask_mod, B, None, L, L, device=segment_ids.device, BLOCK_SIZE=block_size)
