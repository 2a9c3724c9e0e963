"""Which attention path a forward takes, from GLMConfig.attention_backend, the device, the mode
(training or not) and the form of the mask: the dense bool mask (sdpa, reference) or the prefix-LM
kernels on the compact form (glm130b.model.prefix_attention). docs/attention.md."""

from __future__ import annotations

import torch

from glm130b.core.errors import InputError
from glm130b.model.config import GLMConfig
from glm130b.model.masks import CompactMask
from glm130b.model.prefix_attention import PrefixLMPlan, resolve_kernel


def resolve_backend(config: GLMConfig, training: bool) -> str:
    """ "sdpa", "reference" or "prefix". auto: prefix, unless this forward applies attention
    dropout, which only sdpa has (then sdpa)."""
    backend = config.attention_backend
    if backend == "auto":
        return "sdpa" if training and config.attention_dropout > 0 else "prefix"
    return backend


def compute_dtype(device: torch.device, activations: torch.Tensor) -> torch.dtype:
    """The dtype q, k and v will have: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return activations.dtype


def describe_backend(
    config: GLMConfig, device: torch.device, dtype: torch.dtype = torch.float32, training: bool = True
) -> str:
    """What a training forward on `device` with q/k/v of `dtype` runs, in words (for a run's log)."""
    backend = resolve_backend(config, training)
    if backend == "prefix":
        return f"prefix-LM kernel {resolve_kernel(config.prefix_kernel, device, dtype)} on the compact mask"
    why = " (attention_dropout > 0)" if config.attention_backend == "auto" else ""
    return f"{backend} on the dense [B, 1, L, L] mask{why}"


def prepare_mask(
    mask: torch.Tensor | CompactMask, config: GLMConfig, x: torch.Tensor, training: bool, cached: bool = False
) -> torch.Tensor | PrefixLMPlan:
    """What the layers attend with: a dense mask as it is; a compact one as a PrefixLMPlan for the
    prefix backend, else as the dense mask built on the device of `x` (the first layer's input).
    cached: a KV cache is in use."""
    if not isinstance(mask, CompactMask):
        return mask
    if cached:
        raise InputError(
            "a compact mask is for full forwards; decode with a KV cache and the dense mask (CompactMask.dense())"
        )
    if resolve_backend(config, training) == "prefix":
        return PrefixLMPlan.build(
            mask.segment_ids, mask.in_prefix, config.prefix_kernel, x.device, compute_dtype(x.device, x)
        )
    return mask.dense(x.device)
