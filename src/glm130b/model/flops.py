"""FLOPs of training, for MFU and HFU (docs/training.md, Logs and MFU), and of one attention kernel."""

from __future__ import annotations

from glm130b.model.config import GLMConfig


def block_matmul_parameters(config: GLMConfig) -> int:
    """Weights of the transformer blocks' matrices: qkv, dense, h_to_4h (both GeGLU halves), 4h_to_h."""
    C, F = config.hidden_size, config.inner_hidden_size
    branches = 2 if config.ffn == "geglu" else 1
    return config.num_layers * (3 * C * C + C * C + branches * F * C + F * C)


def training_flops(config: GLMConfig, tokens: int, pairs: int, recompute: bool = False) -> float:
    """FLOPs of training `tokens` real (non-pad) tokens whose attention covers `pairs` visible
    (query, key) pairs (glm130b.model.masks.visible_pairs), forward + backward:

        6 * (N_blocks + vocab * hidden) * tokens + 12 * layers * hidden * pairs

    6 = 2 (multiply-add) x 3 (forward, two backward matmuls); the head's logit matmul counts, the
    embedding lookup does not; 12 = QK^T and PV, 2 x 2 x 3, per visible pair only (PaLM's formula
    with the real mask instead of the full square). Model FLOPs, for MFU. recompute=True adds the
    second forward of every block that activation checkpointing runs: hardware FLOPs, for HFU.
    """
    C, L = config.hidden_size, config.num_layers
    blocks, head = block_matmul_parameters(config), config.vocab_size * C
    flops = 6.0 * (blocks + head) * tokens + 12.0 * L * C * pairs
    if recompute:
        flops += 2.0 * blocks * tokens + 4.0 * L * C * pairs
    return flops


def attention_kernel_flops(pairs: int, heads: int, head_dim: int, backward: bool = True) -> float:
    """FLOPs of one attention call over `pairs` visible pairs per head: forward 4 * pairs * D (QK^T
    and PV, 2 per multiply-add), backward 2.5x the forward (5 matmuls against 2, the scores
    recomputed: the flash-attention convention kernel benchmarks report)."""
    forward = 4.0 * pairs * heads * head_dim
    return forward * (3.5 if backward else 1.0)
