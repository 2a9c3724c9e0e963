"""The GLM-130B training loss: cross entropy over the scored tokens only, in fp32.

`masked_lm_loss_sum` is the token sum; every loss of the project is built on it: the mean of one
batch (`masked_lm_loss`), and the sums that data-parallel ranks, accumulated micro-batches and
pipeline microbatches divide by the scored-token count of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of weight x cross entropy (fp32). logits [N, V], targets [N] long, weights [N]."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights.float()).sum()


def masked_lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the cross entropy of the scored tokens (fp32). logits [B, S, V], targets [B, S] long,
    loss_mask [B, S]: the weight of each position's loss (1 scored, 0 not)."""
    return weighted_cross_entropy_sum(logits.flatten(0, 1), targets.flatten(), loss_mask.flatten())


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the scored tokens (fp32), the GLM-130B training loss."""
    return masked_lm_loss_sum(logits, targets, loss_mask) / loss_mask.float().sum().clamp(min=1.0)
