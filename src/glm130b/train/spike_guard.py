"""Loss-spike detection: what the GLM-130B team watched for by hand, as a rule.

A step is a spike when its loss or its gradient norm is non-finite, or far above the median of
the recent healthy steps. The trainer answers a spike the way the team did (SPEC.md section 10):
roll back to the last good checkpoint and skip the batches that caused it, optionally lowering
the learning rate or the embedding gradient scale. This module only decides; the trainer
(glm130b.train.trainer) acts and logs each intervention with its step and reason.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from glm130b.core.config_io import DictConfig, check_field, check_positive_int
from glm130b.core.errors import ConfigError


@dataclass
class SpikeGuardConfig(DictConfig):
    config_label = "spike_guard"

    enabled: bool = True  # watch every step and roll back to the last checkpoint on a spike
    window: int = 50  # healthy steps whose median is the reference
    min_history: int = 20  # no ratio test before this many healthy steps (early losses move fast)
    # A spike is a loss above loss_ratio x median, or a pre-clip grad norm above
    # grad_norm_ratio x median. Loss falls over a window, so its median sits above the current
    # loss and a modest ratio is safe; grad norms swing by several times in healthy training.
    loss_ratio: float = 1.5
    grad_norm_ratio: float = 10.0  # the grad-norm threshold (loss_ratio above is the loss's)
    max_rollbacks: int = 10  # more spikes than this and the run stops with an error
    # Multipliers applied at each rollback (1 = leave unchanged).
    lr_factor: float = 1.0  # on the learning rate
    embedding_grad_scale_factor: float = 1.0  # on the embedding gradient shrink

    def validate(self) -> None:
        check_field("spike_guard.enabled", self.enabled, bool, expected="true or false")
        for name in ("window", "min_history", "max_rollbacks"):
            check_positive_int(f"spike_guard.{name}", getattr(self, name))
        if self.min_history > self.window:
            raise ConfigError(
                f"spike_guard.min_history {self.min_history} exceeds spike_guard.window "
                f"{self.window}; the window must hold that many steps"
            )
        for name in ("loss_ratio", "grad_norm_ratio"):
            check_field(f"spike_guard.{name}", getattr(self, name), float, lambda v: v > 1, "a number above 1")
        for name in ("lr_factor", "embedding_grad_scale_factor"):
            check_field(
                f"spike_guard.{name}", getattr(self, name), float, lambda v: 0 < v <= 1, "in (0, 1] (1 = unchanged)"
            )


class SpikeGuard:
    """`check(loss, grad_norm)` -> the reason a step is a spike, or None; `record` a healthy step."""

    def __init__(self, config: SpikeGuardConfig):
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.grad_norms: deque[float] = deque(maxlen=config.window)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Called before the update is applied. (An fp16 overflow is the loss scaler's business, not a spike.)"""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm}"
        if len(self.losses) < self.config.min_history:
            return None
        loss_median = statistics.median(self.losses)
        if loss > self.config.loss_ratio * loss_median:
            return f"loss {loss:.4g} > {self.config.loss_ratio} x recent median {loss_median:.4g}"
        norm_median = statistics.median(self.grad_norms)
        if grad_norm > self.config.grad_norm_ratio * norm_median:
            return f"gradient norm {grad_norm:.4g} > {self.config.grad_norm_ratio} x recent median {norm_median:.4g}"
        return None

    def record(self, loss: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.config.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.config.window)
