"""Helpers of the trainer tests: a learnable batch source, a tiny run config, a trainer built from it."""

import torch

from glm130b.objective.batch import TrainingBatch
from glm130b.train.builders import build_model_and_optimizer
from glm130b.train.config import TrainConfig
from glm130b.train.metrics import read_metrics
from glm130b.train.trainer import Trainer

VOCAB, LENGTH = 64, 32


class CountingSource:
    """Micro-batches of a learnable language: each row counts up from a random start (mod VOCAB),
    the first quarter is a bidirectional prefix and the rest is scored. Deterministic in (seed,
    index). Indices in `bad` get random targets (a corrupt batch); `stop_at` raises on first use
    (a kill in the middle of a run)."""

    def __init__(self, micro_batch_size=4, seed=0, bad=(), stop_at=None):
        self.micro_batch_size, self.seed, self.bad, self.stop_at = micro_batch_size, seed, set(bad), stop_at
        self.used: list[int] = []

    def micro_batch(self, index: int) -> TrainingBatch:
        if index == self.stop_at:
            self.stop_at = None
            raise KeyboardInterrupt("simulated kill")
        self.used.append(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(0, VOCAB, (self.micro_batch_size, 1), generator=g)
        tokens = (start + torch.arange(LENGTH + 1)) % VOCAB
        targets = tokens[:, 1:]
        if index in self.bad:
            targets = torch.randint(0, VOCAB, targets.shape, generator=g)
        prefix = torch.arange(LENGTH) < LENGTH // 4
        B = self.micro_batch_size
        return TrainingBatch(
            input_ids=tokens[:, :-1],
            position_ids=torch.arange(LENGTH).expand(B, LENGTH),
            targets=targets,
            loss_mask=(~prefix).float().expand(B, LENGTH),
            segment_ids=torch.ones(B, LENGTH, dtype=torch.long),
            in_prefix=prefix.expand(B, LENGTH),
        )


def tiny_run_config(tmp_path, name="run", **overrides) -> TrainConfig:
    settings = dict(
        model_preset="glm-tiny",
        model=dict(vocab_size=VOCAB, max_sequence_length=LENGTH),  # dropout 0.1 stays on
        sequence_length=LENGTH,
        train_samples=8 * 16,
        micro_batch_size=4,
        global_batch_size=8,
        rampup_start_batch_size=4,
        rampup_fraction=0.25,
        lr=3e-3,
        min_lr=3e-4,
        warmup_fraction=0.1,
        precision="fp32",
        out_dir=str(tmp_path / name),
        eval_every=8,
        eval_batches=2,
        checkpoint_every=5,
        keep_checkpoints=2,
        tensorboard=False,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


def make_trainer(config: TrainConfig, source=None) -> Trainer:
    torch.manual_seed(0)
    valid = {"count": [CountingSource(seed=99).micro_batch(i) for i in range(2)]}
    return Trainer(config, build_model_and_optimizer(config), source or CountingSource(), valid, show_progress=False)


def last_loss_per_step(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(f"{out_dir}/metrics", "train")}
