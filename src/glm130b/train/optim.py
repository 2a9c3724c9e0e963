"""The optimiser side of the recipe (SPEC.md section 10): AdamW parameter groups, the learning-rate
schedule, batch-size ramp-up, the embedding-gradient-scale schedule and the fp16 dynamic loss scaler.

Schedules are plain functions of the samples (or steps) trained so far, so resuming needs only
that count.
"""

from __future__ import annotations

import math

import torch

from glm130b.train.config import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices (linear weights, embedding); none on biases and LayerNorms,
    which are exactly the 1-D parameters of a GLM."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # The lr here is a placeholder: the trainer sets each step's lr from learning_rate().
    fused = next(model.parameters()).is_cuda  # the fused CUDA kernel; CPU keeps the default
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=fused or None,
    )


def learning_rate(samples: int, config: TrainConfig) -> float:
    """Linear warmup to lr, cosine decay to min_lr at decay_samples, min_lr after."""
    if samples < config.warmup_samples:
        return config.lr * (samples + 1) / config.warmup_samples  # never 0: step 0 already learns
    if samples >= config.decay_samples:
        return config.min_lr
    progress = (samples - config.warmup_samples) / max(1, config.decay_samples - config.warmup_samples)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch_size_at(samples: int, config: TrainConfig) -> int:
    """Global batch after `samples`: linear from rampup_start_batch_size to global_batch_size over
    rampup_samples, rounded down to whole micro-batches; the last step takes only what remains of
    train_samples (rounded up to a whole micro-batch), so a run trains train_samples, not up to a
    global batch more."""
    micro = config.micro_batch_size
    remaining = -(-(config.train_samples - samples) // micro) * micro
    if samples >= config.rampup_samples:
        return min(config.global_batch_size, remaining)
    start = config.rampup_start_batch_size
    size = start + (config.global_batch_size - start) * samples / config.rampup_samples
    return min(max(start, int(size) // micro * micro), remaining)


def embedding_grad_scale(step: int, config: TrainConfig) -> float:
    """The embedding gradient scale at `step`: a constant, or scale + (1 - scale) * (step - s0) / s1 up to 1."""
    scale = config.embedding_grad_scale
    if config.embedding_grad_scale_ramp_steps == 0:
        return scale
    progress = max(0, step - config.embedding_grad_scale_ramp_start) / config.embedding_grad_scale_ramp_steps
    return min(1.0, scale + (1.0 - scale) * progress)


class DynamicLossScaler:
    """fp16 loss scale: halve after `hysteresis` overflowing steps, double after `window` clean
    steps in a row, never below `minimum` (recipe: 2^16, 2000, 2, 1). An overflowing step is
    skipped by the trainer. Same rule as Megatron-LM's DynamicGradScaler."""

    def __init__(self, initial: float, window: int, hysteresis: int, minimum: float):
        self.scale = float(initial)
        self.window, self.hysteresis, self.minimum = window, hysteresis, minimum
        self.clean_steps = 0  # clean steps since the last overflow or growth
        self.overflows_left = hysteresis  # overflows still tolerated before the next halving

    def update(self, overflow: bool) -> None:
        if overflow:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.minimum)
        else:
            self.clean_steps += 1
            if self.clean_steps == self.window:
                self.clean_steps = 0
                self.overflows_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows_left": self.overflows_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps, self.overflows_left = (
            state["scale"],
            state["clean_steps"],
            state["overflows_left"],
        )

    @classmethod
    def from_config(cls, config: TrainConfig) -> DynamicLossScaler:
        return cls(
            config.initial_loss_scale, config.loss_scale_window, config.loss_scale_hysteresis, config.min_loss_scale
        )
