"""The GLM-130B training loss: cross entropy over the scored tokens only, in fp32.

`masked_lm_loss_sum` is the token sum; every loss of the project is built on it: the mean of one
batch (`masked_lm_loss`), and the sums that data-parallel ranks, accumulated micro-batches and
pipeline microbatches divide by the scored-token count of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the cross entropy of the scored tokens (fp32). logits [B, S, V], targets [B, S] long,
    loss_mask [B, S]: the weight of each position's loss (1 scored, 0 not)."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # [B * S]
    return (per_token * loss_mask.flatten().float()).sum()


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the scored tokens (fp32), the GLM-130B training loss."""
    return masked_lm_loss_sum(logits, targets, loss_mask) / loss_mask.float().sum().clamp(min=1.0)
