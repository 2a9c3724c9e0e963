"""GLM-130B parameter initialisation (SPEC.md section 10), DeepNorm gains on the right rows.

Embeddings N(0, sqrt(1 / 3h)) (the recipe's 0.0052 at h = 12288); linear weights Xavier-normal,
with the DeepNorm gain beta = (2N)^-1/2 on the value rows of every head, the attention output,
the FFN input and output, gain 1 on query and key; biases 0, LayerNorms 1 and 0. Why "the value
rows of every head" differs from the official code: docs/model.md, "Initialisation".
"""

from __future__ import annotations

import math

import torch

from glm130b.model.glm import GLM


def embedding_std(hidden_size: int) -> float:
    return math.sqrt(1.0 / (3 * hidden_size))


def xavier_normal_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@torch.no_grad()
def initialize_glm(model: GLM, seed: int | None = None) -> GLM:
    """Initialise every parameter of `model` in place (on its device); returns the model."""
    cfg = model.config
    generator = None
    if seed is not None:
        device = model.transformer.word_embeddings.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
    beta = 1.0 / cfg.deepnorm_alpha  # (2N)^-1/2, N as in the model's alpha (ChatGLM-6B keeps 28)
    C, H, D, F = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.inner_hidden_size

    model.transformer.word_embeddings.weight.normal_(0.0, embedding_std(C), generator=generator)
    if not cfg.tie_word_embeddings:
        model.lm_head.weight.normal_(0.0, embedding_std(C), generator=generator)
    for layer in model.transformer.layers:
        attention, mlp = layer.attention, layer.mlp
        qkv = attention.query_key_value.weight.view(H, 3, D, C)  # per head: [q_h; k_h; v_h]
        qkv.normal_(0.0, xavier_normal_std(C, C), generator=generator)
        qkv[:, 2].mul_(beta)  # the value rows of every head
        attention.dense.weight.normal_(0.0, xavier_normal_std(C, C, beta), generator=generator)
        # GeGLU: [value half; gate half], each an h -> F projection; the plain FFN has one.
        mlp.dense_h_to_4h.weight.normal_(0.0, xavier_normal_std(C, F, beta), generator=generator)
        mlp.dense_4h_to_h.weight.normal_(0.0, xavier_normal_std(F, C, beta), generator=generator)
        for linear in (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h):
            linear.bias.zero_()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    return model
