"""The training loop: steps, logging, validation, checkpoints and resume, spike-guard rollbacks;
one process, or one rank of a torchrun launch (data, tensor or pipeline parallel).

How a step, a distributed run and a rollback work: docs/training.md.
"""

from __future__ import annotations

import math
import pickle
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm.auto import tqdm

from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import CheckpointError, ConfigError, GLMError
from glm130b.distributed.parallelize import clip_grad_norm_
from glm130b.model.attention import describe_backend
from glm130b.objective.batch import TrainingBatch
from glm130b.train.builders import TrainingModel
from glm130b.train.config import TrainConfig, check_resumable
from glm130b.train.data_setup import BatchSource
from glm130b.train.metrics import MetricsLog, batch_work, device_peak_flops, format_record, throughput
from glm130b.train.optim import DynamicLossScaler, embedding_grad_scale, global_batch_size_at, learning_rate
from glm130b.train.run_checkpoint import RunCheckpoints, RunState
from glm130b.train.spike_guard import SpikeGuard
from glm130b.train.step import (
    all_reduce_sum,
    evaluate,
    forward_backward,
    pipeline_evaluate,
    pipeline_forward_backward,
)

RUN_CONFIG_FILE = "train_config.yaml"
# What reading a truncated or otherwise damaged checkpoint raises: safetensors' and torch.load's
# errors for a short file, a missing one.
UNREADABLE_CHECKPOINT = (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError, KeyError)


class TrainingDiverged(GLMError):
    """The spike guard rolled back more often than allowed."""


class Trainer:
    """Trains `built` (build_model_and_optimizer) to config.train_samples: each step draws the
    step's micro-batches, accumulates their gradient under the run's precision, unscales, clips,
    asks the spike guard, then applies AdamW at the scheduled learning rate. Logs metrics, validates
    every eval_every steps, checkpoints every checkpoint_every, resumes from the newest checkpoint.

    valid_batches: a fixed set of validation batches per name (e.g. per language).
    """

    def __init__(
        self,
        config: TrainConfig,
        built: TrainingModel,
        train_source: BatchSource,
        valid_batches: dict[str, list[TrainingBatch]] | None = None,
        show_progress: bool = True,
    ):
        self.config, self.model, self.optimizer = config, built.model, built.optimizer
        self.mesh, self.runner = built.mesh, built.runner
        mesh = self.mesh
        self.dp_group = mesh["dp"].get_group() if mesh is not None else None
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        self.dp_size = mesh["dp"].size() if mesh is not None else 1
        self.is_main = mesh is None or dist.get_rank() == 0
        share = config.micro_batch_size * self.dp_size  # sequences of one micro-batch on every dp rank
        for name in ("global_batch_size", "rampup_start_batch_size"):
            value = getattr(config, name)
            if mesh is not None and value is not None and value % share:
                raise ConfigError(
                    f"{name} {value} is not a multiple of micro_batch_size x dp = {share}: every "
                    f"data-parallel rank takes whole micro-batches of each global batch; pick a "
                    f"multiple of {share}"
                )
        if self.runner is not None:
            self._check_pipeline_config(config)
        self.train_source, self.valid_batches = train_source, valid_batches or {}
        self.device = next(self.model.parameters()).device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.checkpoints = RunCheckpoints(
            self.checkpoint_dir, config.keep_checkpoints, mesh, flatten_optimizer=self.runner is not None
        )
        self.state = RunState()
        self.stopped_early = False  # by config.time_limit_s, before train_samples
        self.clock = time.monotonic  # tests put a fake one in
        self._saved_step: int | None = None  # the step of the newest checkpoint this launch wrote
        self._launched_at, self._seconds_before = 0.0, 0.0
        self.scaler = DynamicLossScaler.from_config(config)
        self.guard = SpikeGuard(config.spike_guard)
        self.show_progress = show_progress and self.is_main
        self.peak_flops = device_peak_flops(self.device, config.peak_flops)
        self.metrics = MetricsLog(
            self.out_dir / "metrics", config.metrics_format, config.tensorboard, enabled=self.is_main
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run to train_samples (resuming when allowed); returns the last validation losses."""
        cfg = self.config
        # dp ranks differ in seed (their shares are other data); the tp ranks of one dp group share
        # it, so that dropout on their replicated activations keeps the replicas identical.
        torch.manual_seed(cfg.seed + self.dp_rank)
        latest = self.checkpoints.latest()
        if latest is not None and not cfg.resume:
            raise GLMError(
                f"{self.checkpoint_dir} holds checkpoints of an earlier run; set resume: true to "
                "continue it, or pick another out_dir"
            )
        saved_config = self.out_dir / RUN_CONFIG_FILE
        if latest is not None and saved_config.is_file():  # every rank checks: none is left waiting
            check_resumable(type(cfg).load(saved_config), cfg, self.out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(saved_config)
            self.checkpoints.remove_unfinished()
        self._barrier()
        if latest is not None:
            self._resume()
        self.start_clock()
        if latest is None and cfg.spike_guard.enabled:
            self.save_checkpoint()  # a rollback target before the first step
        self.model.train()
        if self.show_progress:
            tqdm.write(f"attention: {describe_backend(self.model.config, self.device, DTYPES[cfg.precision])}")
        with tqdm(
            total=cfg.train_samples,
            initial=min(self.state.samples, cfg.train_samples),
            unit="sample",
            disable=not self.show_progress,
            dynamic_ncols=True,
        ) as progress:
            while self.state.samples < cfg.train_samples:
                if cfg.time_limit_s is not None and self.seconds_trained() >= cfg.time_limit_s:
                    self.stop_for_time(progress)
                    break
                before = self.state.samples
                record = self.step()
                progress.update(self.state.samples - before)
                if record is None:  # rolled back: the bar went back with the samples count
                    continue
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                if self.show_progress and record["step"] % cfg.log_every == 0:
                    progress.write(format_record(record))
                done = self.state.samples >= cfg.train_samples
                if record["step"] % cfg.eval_every == 0 and not done:
                    self.run_validation(progress)
                if record["step"] % cfg.checkpoint_every == 0 or done:
                    self.save_checkpoint()
        valid = self.run_validation()  # the final model's (also when an already finished run is resumed)
        self.metrics.close()
        return valid

    def step(self) -> dict | None:
        """One optimizer step; returns its metrics record, or None when the guard rolled back."""
        cfg, state = self.config, self.state
        start = time.perf_counter()
        size = global_batch_size_at(state.samples, cfg)
        if self.mesh is not None:  # ramp-up sizes rounded down to whole micro-batches per dp rank
            size -= size % (cfg.micro_batch_size * self.dp_size)
        indices = self._take(size // cfg.micro_batch_size)
        micro_batches = [self.train_source.micro_batch(i) for i in indices[self.dp_rank :: self.dp_size]]
        lr = learning_rate(self.schedule_samples(), cfg) * state.lr_factor
        grad_scale = embedding_grad_scale(state.step, cfg) * state.embedding_grad_scale_factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.embedding_grad_scale = grad_scale
        scale = self.scaler.scale if cfg.precision == "fp16" else 1.0

        if self.runner is not None:
            loss = pipeline_forward_backward(self.runner, micro_batches, cfg.precision)
        else:
            loss = forward_backward(self.model, micro_batches, cfg.precision, scale, self.dp_group)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if scale != 1.0:
            for p in params:
                p.grad.div_(scale)
        if self.runner is not None:  # the norm over all stages; the same on every rank
            grad_norm = self.runner.clip_grad_norm_(cfg.grad_clip or math.inf).item()
        elif self.mesh is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf).item()
        else:  # sharded and replicated gradients: the norm over the whole model, the same on every rank
            grad_norm = clip_grad_norm_(params, cfg.grad_clip or math.inf).item()

        overflow = cfg.precision == "fp16" and math.isfinite(loss) and not math.isfinite(grad_norm)
        if overflow:  # the loss scaler's business: skip the update, lower the scale
            self.scaler.update(overflow=True)
        else:
            reason = self.guard.check(loss, grad_norm) if cfg.spike_guard.enabled else None
            reason = self._rank0(reason)  # so that every rank rolls back or none does
            if reason is not None:
                self.optimizer.zero_grad(set_to_none=True)
                self.roll_back(reason, indices)
                return None
            self.optimizer.step()
            self.guard.record(loss, grad_norm)
            if cfg.precision == "fp16":
                self.scaler.update(overflow=False)
            state.samples += size
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        work = batch_work(micro_batches)  # this rank's share; summed over dp: the whole global batch
        if self.dp_group is not None:
            work = all_reduce_sum(work, self.dp_group)
        devices = dist.get_world_size() if self.mesh is not None else 1  # MFU per device of the run
        record = {
            "step": state.step,
            "samples": state.samples,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": scale,
            "batch_size": size,
            "embedding_grad_scale": grad_scale,
            **throughput(
                self.model.config, work, seconds, self.peak_flops, devices, cfg.parallel.activation_checkpointing
            ),
            "skipped_update": overflow,
        }
        self.metrics.write("train", record)
        return record

    def stop_for_time(self, progress: tqdm) -> None:
        """End the run at config.time_limit_s: the schedule has run its course by the clock
        (schedule_samples); the step trained last is checkpointed."""
        self.stopped_early = True
        if self._saved_step != self.state.step:
            self.save_checkpoint()
        if self.show_progress:
            progress.write(
                f"time limit of {self.config.time_limit_s:.0f} s reached after {self.state.samples} of "
                f"{self.config.train_samples} samples, the schedule completed by the clock; a launch with a "
                "higher time_limit_s (or null) trains on"
            )

    def start_clock(self) -> None:
        """Start counting this launch's training time, after what earlier launches spent."""
        self._launched_at, self._seconds_before = self.clock(), self.state.seconds

    def seconds_trained(self) -> float:
        """Training time over every launch, rank 0's on every rank (so that all agree on the
        schedule and stop at the same step)."""
        return self._rank0(self._seconds_before + self.clock() - self._launched_at)

    def schedule_samples(self) -> int:
        """The learning-rate schedule's clock: the samples trained or, under config.time_limit_s and
        past the warmup, the share of the limit spent times train_samples, whichever is further
        along, so that a run the limit cuts short still decays in full. The warmup itself always
        counts samples: run by the clock on a machine at half the expected speed it reached the peak
        rate in half the updates, and four of seven such demo runs threw a gradient spike there
        (steps 44-68; none in runs that warmed up over their samples)."""
        cfg = self.config
        if cfg.time_limit_s is None or self.state.samples < cfg.warmup_samples:
            return self.state.samples
        return max(self.state.samples, int(cfg.train_samples * self.seconds_trained() / cfg.time_limit_s))

    def _rank0(self, value):
        """Rank 0's `value` on every rank: one decision where the ranks' views (a clock, a spike
        verdict) could differ."""
        if self.mesh is None:
            return value
        verdict = [value]
        dist.broadcast_object_list(verdict, src=0)
        return verdict[0]

    def run_validation(self, progress: tqdm | None = None) -> dict[str, float]:
        """The validation loss of every set of valid_batches, logged; {} without validation data."""
        if not self.valid_batches:
            return {}
        if self.runner is not None:
            losses = {
                name: pipeline_evaluate(self.runner, batches, self.config.precision)
                for name, batches in self.valid_batches.items()
            }
        else:
            losses = {
                name: evaluate(self.model, batches, self.config.precision)
                for name, batches in self.valid_batches.items()
            }
        self.metrics.write("valid", {"step": self.state.step, **{f"loss_{k}": v for k, v in losses.items()}})
        if self.show_progress:
            (progress or tqdm).write(
                f"step {self.state.step} validation " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
            )
        return losses

    def _take(self, count: int) -> list[int]:
        """The next `count` micro-batch indices, jumping over skipped ranges."""
        indices, position = [], self.state.data_position
        while len(indices) < count:
            skip = next((end for start, end in self.state.skipped if start <= position < end), None)
            if skip is not None:
                position = skip
                continue
            indices.append(position)
            position += 1
        self.state.data_position = position
        return indices

    def _check_pipeline_config(self, config: TrainConfig) -> None:
        pcfg = self.runner.pcfg  # dp and pp_microbatches resolved
        if config.precision == "fp16":
            raise ConfigError(
                "precision fp16 with parallel.pp > 1: the pipeline schedule has no loss scaling; "
                "use precision bf16 (or fp32)"
            )
        if config.rampup_start_batch_size not in (None, config.global_batch_size):
            raise ConfigError(
                f"rampup_start_batch_size {config.rampup_start_batch_size} with parallel.pp > 1: the "
                "pipeline stages fix their activation shapes at the first step, so every step needs "
                "the same batch size; set rampup_start_batch_size: null"
            )
        share = config.global_batch_size // pcfg.dp  # sequences of one dp rank per step
        if share % pcfg.microbatches:
            raise ConfigError(
                f"global_batch_size {config.global_batch_size} / dp {pcfg.dp} = {share} sequences per "
                f"pipeline step do not split into parallel.pp_microbatches {pcfg.microbatches} "
                f"equal pieces; pick pp_microbatches dividing {share}"
            )

    # ------------------------------------------------------------------ spike handling
    def roll_back(self, reason: str, spike_indices: list[int]) -> None:
        """Restore the newest checkpoint, never use this step's micro-batches again, and apply
        the guard's lr and embedding-gradient-scale factors. Logged as an intervention."""
        guard_cfg, kept = self.config.spike_guard, self.state
        spike_step = kept.step + 1
        if kept.rollbacks >= guard_cfg.max_rollbacks:
            raise TrainingDiverged(
                f"step {spike_step}: {reason}, after {kept.rollbacks} rollbacks already (spike_guard.max_rollbacks); "
                "lower lr, set spike_guard.lr_factor below 1, or check the data"
            )
        target = self.checkpoints.latest()
        if target is None:
            raise TrainingDiverged(
                f"step {spike_step}: {reason}, and no checkpoint to roll back to in {self.checkpoint_dir}"
            )
        skipped = kept.skipped + [[i, i + 1] for i in spike_indices]
        lr_factor = kept.lr_factor * guard_cfg.lr_factor
        grad_scale_factor = kept.embedding_grad_scale_factor * guard_cfg.embedding_grad_scale_factor
        rollbacks = kept.rollbacks + 1
        self._load(target)
        self.state.skipped = _merge_ranges(skipped)
        self.state.lr_factor, self.state.embedding_grad_scale_factor = lr_factor, grad_scale_factor
        self.state.rollbacks = rollbacks
        intervention = {
            "step": spike_step,
            "reason": reason,
            "rolled_back_to": self.state.step,
            "skipped_micro_batches": f"{spike_indices[0]}..{spike_indices[-1]}",
            "lr_factor": lr_factor,
            "embedding_grad_scale_factor": grad_scale_factor,
        }
        self.metrics.write("intervention", intervention)
        if self.show_progress:
            tqdm.write(
                f"spike guard: step {spike_step}: {reason}; rolled back to step {self.state.step}, "
                f"skipping micro-batches {spike_indices[0]}..{spike_indices[-1]}, lr x{lr_factor:g}, "
                f"embedding gradient scale x{grad_scale_factor:g}"
            )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write step_<step> atomically (run_checkpoint.RunCheckpoints) and prune old ones."""
        self.state.seconds = self.seconds_trained()  # collective like the save itself
        state = {
            "run": asdict(self.state),
            "loss_scaler": self.scaler.state_dict(),
            "spike_guard": self.guard.state_dict(),
            "config": self.config.to_dict(),
        }
        self._saved_step = self.state.step
        return self.checkpoints.save(self.state.step, self.model, self.optimizer, state)

    def _resume(self) -> None:
        """Restore the newest checkpoint that can be read. One process: a damaged one (a copy or a
        disk cut short) is passed over with a warning naming it. Under torchrun every rank loads the
        newest, since ranks that disagreed on which one would wait on each other forever."""
        candidates = self.checkpoints.all()[::-1] if self.mesh is None else [self.checkpoints.latest()]
        for directory in candidates:
            try:
                self._load(directory)
            except UNREADABLE_CHECKPOINT as err:
                if self.mesh is not None:
                    raise
                warnings.warn(
                    f"{directory} cannot be read ({type(err).__name__}: {str(err)[:160]}); trying the one before it",
                    stacklevel=2,
                )
                continue
            self.metrics.forget_after(self.state.step)
            self._saved_step = self.state.step
            if self.show_progress:
                tqdm.write(f"resumed from {directory} (step {self.state.step})")
            return
        raise CheckpointError(
            f"no checkpoint in {self.checkpoint_dir} can be read (see the warnings); start a new run with "
            "--out_dir NEW_DIR"
        )

    def _load(self, directory: Path) -> None:
        state, rng_restored = self.checkpoints.load(directory, self.model, self.optimizer, self.device)
        self.scaler.load_state_dict(state["loss_scaler"])
        self.guard.load_state_dict(state["spike_guard"])
        self.state = RunState(**state["run"])
        if not rng_restored:  # a rank the saving launch did not have: a fresh stream of its own
            torch.manual_seed(self.config.seed + self.state.step + self.dp_rank)

    def _barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged
