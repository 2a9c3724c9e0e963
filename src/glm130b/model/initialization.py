"""GLM-130B parameter initialisation (SPEC.md section 10), DeepNorm gains on the right rows.

- word embeddings N(0, sqrt(1 / (3 h))): the recipe's 0.0052 is exactly this at h = 12288
  (sqrt(1 / 36864) = 0.00521); scaling with width keeps the tied logits of a small model at the
  same scale.
- every linear weight Xavier-normal, std = gain * sqrt(2 / (fan_in + fan_out)), with the DeepNorm
  gain beta = (2N)^-1/2 on the value projection, the attention output, both GeGLU input halves
  and the FFN output, and gain 1 on the query and key projections (DeepNet, Wang et al. 2022).
  q, k, v and the two GeGLU halves are separate h -> h and h -> ffn projections fused into one
  matrix, so each is initialised with its own fans.
- biases 0; LayerNorm weight 1, bias 0; an untied output head like the embedding.

The value rows. The fused query_key_value weight is laid out PER HEAD, [q_0; k_0; v_0; q_1; ...]
(SPEC.md section 3). The official training code scaled rows 2h..3h of it, as if the layout were
[all q; all k; all v]: in the per-head layout those rows are the q, k and v of the last third of
the heads, so the value rows of the other heads kept gain 1 and some query and key rows got
beta. Here beta goes to v_h of every head, the rows the attention really uses as values.
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
