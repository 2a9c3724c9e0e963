"""The spike guard: the rule on its own, then injected failures in short real runs."""

import math

import pytest

import glm130b.train.trainer as trainer_module
from glm130b.core.errors import ConfigError
from glm130b.train.metrics import read_metrics
from glm130b.train.spike_guard import SpikeGuard, SpikeGuardConfig
from glm130b.train.trainer import TrainingDiverged
from tests.train.helpers import CountingSource, make_trainer, tiny_run_config


def warmed_guard(**overrides) -> SpikeGuard:
    guard = SpikeGuard(SpikeGuardConfig(window=10, min_history=5, **overrides))
    for loss in (3.0, 2.9, 3.1, 2.8, 3.0, 2.95):
        guard.record(loss, grad_norm=1.0)
    return guard


def test_rule_flags_non_finite_values_even_without_history():
    guard = SpikeGuard(SpikeGuardConfig())
    assert "non-finite loss" in guard.check(math.nan, 1.0)
    assert "non-finite gradient norm" in guard.check(2.0, math.inf)
    assert guard.check(100.0, 1e6) is None  # no ratio test before min_history healthy steps


def test_rule_compares_with_the_median_of_recent_healthy_steps():
    guard = warmed_guard(loss_ratio=1.5, grad_norm_ratio=10.0)
    assert guard.check(3.5, 5.0) is None  # ordinary noise
    assert "loss 4.6" in guard.check(4.6, 1.0)  # > 1.5 x median 2.975
    assert "gradient norm 11" in guard.check(3.0, 11.0)
    guard.record(50.0, 1.0)  # one outlier cannot move a median of many
    assert guard.check(4.6, 1.0) is not None


def test_bad_guard_settings_are_refused():
    with pytest.raises(ConfigError, match="loss_ratio"):
        SpikeGuardConfig(loss_ratio=0.9).validate()
    with pytest.raises(ConfigError, match="min_history"):
        SpikeGuardConfig(window=5, min_history=6).validate()


def test_injected_bad_batch_is_rolled_back_and_skipped(tmp_path):
    # Micro-batch 30 has random targets; by then the model predicts the counting language well.
    config = tiny_run_config(
        tmp_path,
        train_samples=8 * 24,
        rampup_start_batch_size=None,
        spike_guard={"window": 10, "min_history": 5},
        lr=1e-2,
    )
    source = CountingSource(bad={30})
    trainer = make_trainer(config, source)
    valid = trainer.train()
    [event] = read_metrics(f"{config.out_dir}/metrics", "intervention")
    assert event["step"] == 16 and event["rolled_back_to"] == 15  # micro-batches 30, 31 form step 16
    assert "loss" in event["reason"]
    assert trainer.state.skipped == [[30, 32]]
    # after the rollback, step 16 is made of micro-batches 32 and 33; 30 is never trained on
    assert source.used.count(30) == 1 and source.used.count(31) == 1
    losses = {r["step"]: r["loss"] for r in read_metrics(f"{config.out_dir}/metrics", "train")}
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses.values()) and math.isfinite(valid["count"])


def test_learning_rate_blow_up_is_rolled_back_with_a_lower_rate(tmp_path, monkeypatch):
    # Once, at 80 samples, the schedule returns a rate 1e4 times too high: the update of that step
    # wrecks the model and the next step's loss or gradient shows it.
    config = tiny_run_config(
        tmp_path,
        train_samples=8 * 20,
        rampup_start_batch_size=None,
        checkpoint_every=4,
        spike_guard={"window": 10, "min_history": 5, "lr_factor": 0.5},
    )
    real = trainer_module.learning_rate
    fired = []

    def faulty_learning_rate(samples, cfg):
        if samples == 80 and not fired:
            fired.append(samples)
            return 1e4 * real(samples, cfg)
        return real(samples, cfg)

    monkeypatch.setattr(trainer_module, "learning_rate", faulty_learning_rate)
    trainer = make_trainer(config)
    trainer.train()
    events = read_metrics(f"{config.out_dir}/metrics", "intervention")
    assert events and events[0]["step"] == 12 and events[0]["rolled_back_to"] == 8
    assert trainer.state.lr_factor == 0.5 ** len(events)
    final = read_metrics(f"{config.out_dir}/metrics", "train")[-1]
    assert final["step"] == 20 and math.isfinite(final["loss"]) and final["loss"] < 3.0


def test_endless_spikes_stop_the_run_with_a_clear_error(tmp_path):
    config = tiny_run_config(
        tmp_path,
        train_samples=8 * 40,
        rampup_start_batch_size=None,
        spike_guard={"window": 10, "min_history": 5, "max_rollbacks": 2},
        lr=1e-2,
    )
    trainer = make_trainer(config, CountingSource(bad=set(range(30, 200))))
    with pytest.raises(TrainingDiverged, match="max_rollbacks"):
        trainer.train()
