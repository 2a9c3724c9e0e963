"""What `glm130b info` says of a model's shape (`describe`): parameters and weight bytes at each
width. The command itself (glm130b.checkpoint.commands) adds what a model directory holds."""

from __future__ import annotations

import torch

from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM

GIB = 2**30
# Bytes per parameter of the four linear layers at each width (+ fp16 scales, negligible), and of the rest.
WIDTHS = (("fp16", 2.0), ("INT8", 1.0), ("INT4", 0.5))


def describe(config: GLMConfig) -> list[str]:
    with torch.device("meta"):
        model = GLM(config)
    total = model.num_parameters()
    linear = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("transformer.layers.") and name.endswith(".weight") and p.dim() == 2
    )
    lines = [
        f"layers {config.num_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
        f"vocab {config.vocab_size}, ffn {config.ffn} {config.inner_hidden_size}, "
        f"positions {config.position_encoding} up to {config.max_sequence_length}",
        f"parameters: {total:,}",
    ]
    lines += [
        f"weights with {name} linears: {(linear * width + (total - linear) * 2) / GIB:,.2f} GiB"
        for name, width in WIDTHS
    ]
    return lines
