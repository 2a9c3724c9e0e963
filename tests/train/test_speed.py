"""glm130b.train.speed: the measured training speed and the samples a time budget affords."""

import math

from glm130b.train.speed import samples_within, training_speed
from tests.train.helpers import CountingSource, tiny_run_config


def test_samples_within_round_down_to_whole_batches_and_never_exceed_the_config(tmp_path):
    config = tiny_run_config(tmp_path)  # 128 samples, global batch 8
    assert samples_within(config, seconds=10, samples_per_second=5.5) == 48  # 55 -> 6 batches
    assert samples_within(config, seconds=10, samples_per_second=100) == 128  # the config's, no more
    assert samples_within(config, seconds=0.01, samples_per_second=5) == 8  # one batch at the least


def test_training_speed_is_measured_on_a_throwaway_model_and_writes_nothing_to_the_run(tmp_path):
    config = tiny_run_config(tmp_path)
    source = CountingSource(micro_batch_size=config.micro_batch_size)
    speed = training_speed(config, source, steps=2)
    assert math.isfinite(speed) and speed > 0
    # one warm-up and two timed steps of the full global batch (2 micro-batches each), no ramp-up
    assert len(source.used) == 3 * 2
    assert not (tmp_path / "run").exists()
