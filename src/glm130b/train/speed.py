"""How fast this machine trains a config: a few full-size optimizer steps of a throwaway model on
the run's data, timed (`training_speed`), and the train_samples that fit a time budget
(`samples_within`)."""

from __future__ import annotations

import dataclasses
import tempfile
import time

from glm130b.train.builders import build_model_and_optimizer
from glm130b.train.config import TrainConfig
from glm130b.train.data_setup import BatchSource
from glm130b.train.trainer import Trainer

WARMUP_STEPS = 1  # the first step pays for allocations and kernel choices: untimed
TIMED_STEPS = 4  # ~2 s on 2 CPU cores at the demo's size; the step time varies by a few percent


def training_speed(config: TrainConfig, source: BatchSource, steps: int = TIMED_STEPS) -> float:
    """Samples per second of `config`'s training steps on `source` at the full global batch (no
    ramp-up, validation or checkpoints), measured on a throwaway model; nothing is written to
    config.out_dir."""
    with tempfile.TemporaryDirectory(prefix="glm130b-speed-") as scratch:
        probe = dataclasses.replace(
            config,
            train_samples=(WARMUP_STEPS + steps) * config.global_batch_size,  # every step a full batch
            rampup_start_batch_size=None,
            out_dir=scratch,
            tensorboard=False,
        )
        trainer = Trainer(probe, build_model_and_optimizer(probe), source, show_progress=False)
        for _ in range(WARMUP_STEPS):
            trainer.step()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        seconds = time.perf_counter() - start
        trainer.metrics.close()
    return steps * config.global_batch_size / seconds


def samples_within(config: TrainConfig, seconds: float, samples_per_second: float) -> int:
    """config.train_samples, or fewer where the steps would take longer than `seconds`: rounded
    down to whole global batches, never under one."""
    affordable = int(seconds * samples_per_second) // config.global_batch_size * config.global_batch_size
    return max(config.global_batch_size, min(config.train_samples, affordable))
