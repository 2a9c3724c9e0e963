"""The spike detector on synthetic curves whose events are known exactly."""

import math

import pytest

from glm130b.ablation.spikes import SpikeRule, find_spikes
from glm130b.core.errors import ConfigError

RULE = SpikeRule(factor=1.5, window=10, min_history=5)


def curve(length, base=2.0, **changes):
    """`length` steps at `base`, with {step: loss} overrides; steps count from 1 as the trainer's do."""
    losses = [changes.get(f"s{step}", base) for step in range(1, length + 1)]
    return list(range(1, length + 1)), losses


def spans(verdict):
    return [(e.start, e.peak, e.end) for e in verdict.events]


def test_flat_and_falling_curves_have_no_events():
    assert spans(find_spikes(*curve(60), RULE)) == []
    steps = list(range(1, 201))
    falling = [10 / math.sqrt(s) * (1.1 if s % 2 else 0.9) for s in steps]  # +-10 % wobble around 1/sqrt
    verdict = find_spikes(steps, falling, RULE)
    assert spans(verdict) == [] and verdict.divergence is None


def test_events_are_counted_with_start_peak_and_end():
    steps, losses = curve(60, s20=3.5, s30=4.0, s31=6.0, s32=5.0, s45=3.2)
    verdict = find_spikes(steps, losses, RULE)
    # one step, three steps (peak in the middle), one step; each ends at the next step back to 2.0
    assert spans(verdict) == [(20, 20, 21), (30, 31, 33), (45, 45, 46)]
    assert [e.baseline for e in verdict.events] == [2.0, 2.0, 2.0]
    assert verdict.divergence is None


def test_threshold_is_strict_and_waits_for_history():
    # s3: before min_history (5 healthy steps); s10: exactly 1.5 x 2.0, not above it
    steps, losses = curve(30, s3=50.0, s10=3.0, s11=3.0001)
    assert spans(find_spikes(steps, losses, RULE)) == [(11, 11, 12)]


def test_baseline_is_a_robust_median_of_healthy_steps_only():
    # a 4-step spike to 100 does not enter the baseline, and a lone 2.5 among 2.0s does not move
    # the median: 3.1 at step 40 is still a spike (> 1.5 x 2.0)
    changes = {f"s{s}": 100.0 for s in range(20, 24)}
    steps, losses = curve(50, s30=2.5, s40=3.1, **changes)
    assert spans(find_spikes(steps, losses, RULE)) == [(20, 20, 24), (40, 40, 41)]


def test_a_loss_that_never_comes_back_is_divergence():
    # from step 40 on the loss sits at 3.5: one open event of 21 steps >= window 10
    changes = {f"s{s}": 3.5 for s in range(40, 61)}
    verdict = find_spikes(*curve(60, **changes), RULE)
    assert spans(verdict) == [(40, 40, None)]
    assert verdict.divergence == "loss above 1.5 x its baseline 2 from step 40 to the end: never recovered"


def test_a_short_open_event_at_the_end_is_a_spike_not_divergence():
    changes = {f"s{s}": 3.5 for s in range(55, 61)}  # 6 steps < window 10
    verdict = find_spikes(*curve(60, **changes), RULE)
    assert spans(verdict) == [(55, 55, None)] and verdict.divergence is None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_is_divergence_and_ends_the_scan(bad):
    steps, losses = curve(60, s15=4.0, s25=bad, s26=9.0)
    verdict = find_spikes(steps, losses, RULE)
    assert spans(verdict) == [(15, 15, 16)]  # nothing after the NaN is read
    assert verdict.divergence == f"non-finite loss ({bad}) at step 25"


def test_step_numbers_are_taken_from_the_records():
    steps, losses = curve(40, s30=5.0)
    steps = [s * 10 for s in steps]  # e.g. records thinned out
    assert spans(find_spikes(steps, losses, RULE)) == [(300, 300, 310)]


@pytest.mark.parametrize(
    "rule, message",
    [
        (SpikeRule(factor=1.0), "spike factor must be a number above 1, got 1.0"),
        (SpikeRule(window=10, min_history=20), "spike min_history 20 exceeds the window 10"),
    ],
)
def test_bad_rule_is_one_clear_line(rule, message):
    with pytest.raises(ConfigError, match=message):
        rule.validate()
