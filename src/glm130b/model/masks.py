"""GLM attention patterns in compact form (SPEC.md sections 5 and 10) and the dense bool mask.

Per token: segment_ids (tokens attend only within their segment; 0 marks padding; a [MASK]
sequence packs several segments) and in_prefix (True for the bidirectional context of a segment).
Query i may see key j  <=>  segment_ids[i] == segment_ids[j] != 0  and  (in_prefix[j] or j <= i).
"""

from __future__ import annotations

import torch


def visibility(segment_ids: torch.Tensor, in_prefix: torch.Tensor, q_idx, kv_idx) -> torch.Tensor:
    """The mask rule over index tensors, usable both densely and as a FlexAttention mask_mod body."""
    same = (segment_ids[..., q_idx] == segment_ids[..., kv_idx]) & (segment_ids[..., kv_idx] != 0)
    return same & (in_prefix[..., kv_idx] | (kv_idx <= q_idx))


def dense_attention_mask(segment_ids: torch.Tensor, in_prefix: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, L, L], True = blocked. A pad row sees only itself (a fully blocked row is NaN in
    some fused kernels); pad outputs carry no loss."""
    L = segment_ids.shape[-1]
    idx = torch.arange(L, device=segment_ids.device)
    visible = visibility(segment_ids, in_prefix, idx.view(L, 1), idx.view(1, L))  # [B, L, L]
    visible |= torch.eye(L, dtype=torch.bool, device=segment_ids.device) & (segment_ids == 0).unsqueeze(-1)
    return ~visible.unsqueeze(1)
