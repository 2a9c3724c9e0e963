"""A training batch and its attention pattern in compact form (SPEC.md sections 5 and 10).

The pattern of every GLM sample is described per token by two values, from which both the dense
bool mask and a kernel mask (e.g. a FlexAttention block mask) are built:
- segment_ids: tokens attend only within their segment; 0 marks padding. A [gMASK] or MIP sample
  is one segment; a [MASK] sequence holds several (block-diagonal, positions restart in each).
- in_prefix: True for the bidirectional part of a segment (its context, mask tokens included).
Query i may see key j  <=>  segment_ids[i] == segment_ids[j] != 0  and  (in_prefix[j] or j <= i).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


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


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor     # [B, L] long
    position_ids: torch.Tensor  # [B, L] long (1-D) or [B, 2, L] (2-D)
    targets: torch.Tensor       # [B, L] long: the token each position predicts
    loss_mask: torch.Tensor     # [B, L] float: 1 where the target is scored, else 0
    segment_ids: torch.Tensor   # [B, L] long, 0 = pad
    in_prefix: torch.Tensor     # [B, L] bool

    def attention_mask(self) -> torch.Tensor:
        return dense_attention_mask(self.segment_ids, self.in_prefix)

    def to(self, device: torch.device | str) -> "TrainingBatch":
        return TrainingBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the scored tokens (fp32), the GLM-130B training loss."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = loss_mask.flatten().float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
