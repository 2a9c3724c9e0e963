"""P-tuning v2 (Liu et al. 2022; THUDM's method for ChatGLM-6B): trainable keys and values of P
virtual tokens in every attention layer, seen by every query ahead of the tokens' own.

The model's only hook is `SelfAttention.prefix` (glm130b.model.glm): a `PrefixKeyValues` set there
extends the keys, values and mask after the KV cache, so a prefix needs no cache slots, no position
and no change to generation. Prefix keys get no rotary, as a cache would hold them unrotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm130b.core.config_io import check_positive_int
from glm130b.model.glm import GLM, SelfAttention

PREFIX_KEY = ".attention.prefix."  # in the state-dict key of every prefix tensor
# THUDM's P-tuning v2 draws the prefix from nn.Embedding's N(0, 1). Keys and values that large swamp
# a freshly loaded model's attention; a small spread starts the prefix near a no-op (values ~ 0,
# keys giving near-average scores) and training takes it from there.
INIT_STD = 0.02


class PrefixKeyValues(nn.Module):
    """Keys and values [H, P, D] of one layer's P virtual tokens; `forward` puts them in front."""

    def __init__(self, length: int, heads: int, head_dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.key = nn.Parameter(torch.zeros(heads, length, head_dim, device=device))
        self.value = nn.Parameter(torch.zeros(heads, length, head_dim, device=device))

    @property
    def length(self) -> int:
        return self.key.shape[1]

    def forward(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """k, v [B, H, T, D], mask [B, 1, S, T] (True = blocked) -> [B, H, P + T, D] twice and the
        mask [B, 1, S, P + T] with the prefix visible to every row."""
        B = k.shape[0]
        key = self.key.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1)  # [B, H, P, D]
        value = self.value.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        mask = F.pad(mask, (self.length, 0), value=False)
        return torch.cat((key, k), dim=2), torch.cat((value, v), dim=2), mask


def add_prefix(model: GLM, length: int, seed: int = 0) -> GLM:
    """Attach a PrefixKeyValues of `length` virtual tokens to every layer (in place), drawn from
    N(0, INIT_STD^2) with `seed`, on the device of the model's weights, fp32 (the trainable copy)."""
    check_positive_int("prefix_length", length)
    cfg = model.config
    device = model.transformer.word_embeddings.weight.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for attention in (m for m in model.modules() if isinstance(m, SelfAttention)):
        prefix = PrefixKeyValues(length, cfg.num_attention_heads, cfg.head_dim)
        with torch.no_grad():
            for p in prefix.parameters():
                p.normal_(0.0, INIT_STD, generator=generator)
        attention.prefix = prefix.to(device)
    return model


def prefix_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The prefix tensors by state-dict key (`transformer.layers.3.attention.prefix.key`), from
    `state` when given (a sharded model's, gathered whole)."""
    return {k: v for k, v in (model.state_dict() if state is None else state).items() if PREFIX_KEY in k}


def prefix_length(model: nn.Module) -> int | None:
    """P of the attached prefixes, None without any."""
    return next((m.length for m in model.modules() if isinstance(m, PrefixKeyValues)), None)
