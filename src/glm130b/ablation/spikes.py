"""Loss spikes and divergence read off a finished loss curve.

A spike event starts at the first step whose loss is above `factor` x the baseline, the median of
the last `window` healthy losses (robust: one wild step does not move it), and ends at the first
step back at or below that threshold. Steps inside an event never enter the baseline, so a loss
that jumps to a higher level and stays there remains one open event. A run diverged when a loss is
non-finite, or when it ends inside an event that has lasted `window` steps or more (never recovered).

The same rule with grad_factor finds gradient-norm spikes (their divergence verdict is not used).
Unlike glm130b.train.spike_guard, which decides online whether to roll back, this only reads curves.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import ConfigError


@dataclass(frozen=True)
class SpikeRule:
    # 1.3: per-step losses of small runs wander by ~10 % around their trend (batch to batch); a
    # step 30 % above the median of its recent past is far outside that.
    factor: float = 1.3
    # The same rule on the gradient norm (before clipping), whose spikes the paper saw come before
    # loss spikes: healthy norms swing by several times, so 10 (the spike guard's default ratio).
    grad_factor: float = 10.0
    window: int = 50  # healthy steps in the baseline median
    min_history: int = 20  # no test before this many healthy steps (the first losses fall fast)

    def validate(self) -> SpikeRule:
        check_field("spike factor", self.factor, float, lambda v: v > 1, "a number above 1")
        check_field("gradient-norm spike factor", self.grad_factor, float, lambda v: v > 1, "a number above 1")
        check_positive_int("spike window", self.window)
        check_positive_int("spike min_history", self.min_history)
        if self.min_history > self.window:
            raise ConfigError(f"spike min_history {self.min_history} exceeds the window {self.window}")
        return self


@dataclass
class SpikeEvent:
    start: int  # first step above the threshold
    peak: int  # step of the highest loss of the event (the first, on ties)
    peak_loss: float
    baseline: float  # the running median when the event began
    end: int | None = None  # first step back at or below the threshold; None = still above at the end


@dataclass
class CurveVerdict:
    events: list[SpikeEvent] = field(default_factory=list)
    divergence: str | None = None  # why the run counts as diverged; None = it did not


def find_spikes(steps: list[int], losses: list[float], rule: SpikeRule = SpikeRule()) -> CurveVerdict:
    """The spike events of a loss curve (`losses[i]` at `steps[i]`, in step order). Scanning stops
    at the first non-finite loss: after it the weights are typically NaN and nothing is comparable."""
    verdict = CurveVerdict()
    history: deque[float] = deque(maxlen=rule.window)
    event: SpikeEvent | None = None  # the open one
    for step, loss in zip(steps, losses):
        if not math.isfinite(loss):
            verdict.divergence = f"non-finite loss ({loss}) at step {step}"
            return verdict
        if event is not None:
            if loss > rule.factor * event.baseline:
                if loss > event.peak_loss:
                    event.peak, event.peak_loss = step, loss
                continue
            event.end, event = step, None
        if len(history) >= rule.min_history:
            baseline = statistics.median(history)
            if loss > rule.factor * baseline:
                event = SpikeEvent(start=step, peak=step, peak_loss=loss, baseline=baseline)
                verdict.events.append(event)
                continue
        history.append(loss)
    # steps spent above the threshold counted on the step axis (records may skip step numbers)
    if event is not None and steps[-1] - event.start + 1 >= rule.window:
        verdict.divergence = (
            f"loss above {rule.factor:g} x its baseline {event.baseline:.4g} from step "
            f"{event.start} to the end: never recovered"
        )
    return verdict
