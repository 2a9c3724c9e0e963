"""The GLM-130B training loss: cross entropy over the scored tokens only, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the scored tokens (fp32), the GLM-130B training loss."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    weights = loss_mask.flatten().float()
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
