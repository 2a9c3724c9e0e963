"""TrainingBatch: the tensors of one micro-batch of GLM samples, attention in compact form
(segment ids + prefix flags, glm130b.model.masks)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from glm130b.model.masks import CompactMask, dense_attention_mask


@dataclass
class TrainingBatch:
    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long (1-D) or [B, 2, L] (2-D)
    targets: torch.Tensor  # [B, L] long: the token each position predicts
    loss_mask: torch.Tensor  # [B, L] float: 1 where the target is scored, else 0
    segment_ids: torch.Tensor  # [B, L] long, 0 = pad
    in_prefix: torch.Tensor  # [B, L] bool

    def attention_mask(self) -> torch.Tensor:
        """The dense bool mask [B, 1, L, L], True = blocked."""
        return dense_attention_mask(self.segment_ids, self.in_prefix)

    def compact_mask(self) -> CompactMask:
        """The mask as the model takes it in training: no [L, L] tensor (GLMConfig.attention_backend
        decides what the model builds from it)."""
        return CompactMask(self.segment_ids, self.in_prefix)

    def to(self, device: torch.device | str) -> TrainingBatch:
        return TrainingBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())
