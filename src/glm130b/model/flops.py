"""Model FLOPs of training, for MFU (docs/training.md, Logs and MFU)."""

from __future__ import annotations

from glm130b.model.config import GLMConfig


def training_flops_per_token(config: GLMConfig, sequence_length: int) -> float:
    """Model FLOPs of one trained token (forward + backward, no recomputation counted):

        6 * (N_matmul) + 12 * layers * hidden * sequence_length

    N_matmul = the parameters of the non-embedding matrices plus vocab x hidden for the output
    head (the embedding lookup is free, the logit matmul is not); 6 = 2 (multiply-add) x 3
    (forward, two backward matmuls). The second term is attention scores and weighted sum,
    2 matmuls x 2 x 3 over the full sequence, as dense kernels compute them (PaLM's formula).
    """
    C, F, L = config.hidden_size, config.inner_hidden_size, config.num_layers
    branches = 2 if config.ffn == "geglu" else 1
    per_layer = 3 * C * C + C * C + branches * F * C + F * C  # qkv, dense, h_to_4h, 4h_to_h
    matmul_params = L * per_layer + config.vocab_size * C
    return 6.0 * matmul_params + 12.0 * L * C * sequence_length
