"""GLM attention patterns in compact form (SPEC.md sections 5 and 10) and the dense bool mask.

Per token: segment_ids (tokens attend only within their segment; 0 marks padding; a [MASK]
sequence packs several segments) and in_prefix (True for the bidirectional context of a segment).
Query i may see key j  <=>  segment_ids[i] == segment_ids[j] != 0  and  (in_prefix[j] or j <= i).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class CompactMask(NamedTuple):
    """The attention mask of a full forward in compact form: segment_ids [B, L] integer (0 = pad),
    in_prefix [B, L] bool. `GLM.forward` takes it in place of the dense mask; a NamedTuple, so
    pipeline schedules split it into microbatches like the other inputs."""

    segment_ids: torch.Tensor
    in_prefix: torch.Tensor

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense bool mask [B, 1, L, L] (True = blocked), built on `device`."""
        return dense_attention_mask(self.segment_ids.to(device), self.in_prefix.to(device))


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


def visible_pairs(segment_ids: torch.Tensor, in_prefix: torch.Tensor) -> int:
    """The (query, key) pairs the rule allows, pad rows left out: the unit of attention work.
    Counted per query without an [L, L] tensor: its segment's prefix keys plus its segment's
    non-prefix keys up to itself."""
    seg = segment_ids.long().cpu()
    own = torch.nn.functional.one_hot(seg, int(seg.max()) + 1)[..., 1:]  # [B, L, segments]; pad has none
    prefix = in_prefix.cpu().unsqueeze(-1)
    prefix_keys = (own * prefix).sum(1, keepdim=True)  # [B, 1, segments]
    causal_keys = (own * ~prefix).cumsum(1)  # [B, L, segments]: non-prefix keys at or before i
    return int(((prefix_keys + causal_keys) * own).sum())
