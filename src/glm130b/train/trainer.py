"""GLM pretraining: the step, the loop, logging, validation, checkpoints, resume; one process, or
many under torchrun.

One step: draw the step's micro-batches (batch ramp-up decides how many), forward and backward
each under the run's precision (gradient accumulation, token-weighted), unscale, clip, ask the
spike guard, then apply AdamW with the scheduled learning rate. The Trainer takes its model and
optimizer as given: `build_run_model_and_optimizer` picks the single-process builder
(`build_model_and_optimizer`) or the parallelized one of glm130b.parallel.

Batches come from samplers with `batch(index) -> TrainingBatch`, deterministic in (seed, index),
each of micro_batch_size sequences; the data position is the index of the next micro-batch.

Checkpoints (`<out_dir>/checkpoints/step_XXXXXXXX/`) hold the model directory of
glm130b.checkpoint plus `trainer_state.pt` (optimizer, loss scale, schedule position, data
position, RNG, spike-guard history). A checkpoint is written under a hidden temporary name and
renamed into place, so a kill during the save leaves the previous one loadable; the newest
`keep_checkpoints` are kept. A resumed fp32 CPU run reproduces the uninterrupted run exactly.

Under torchrun (RANK set) `run_pretraining` builds a [pp, dp, tp] mesh from `config.parallel` and
the parallelized model (glm130b.parallel), and hands the Trainer the mesh. Each dp rank then takes
micro-batches r, r + dp, ... of every global batch (tp ranks of one dp group take the same ones),
the loss is normalised by the global scored-token count, the spike guard's verdict comes from rank
0, and checkpoints are torch.distributed.checkpoint directories (written by every rank into a
temporary directory that rank 0 renames), so a run resumes under any other layout. Only rank 0
logs and writes files other than checkpoint shards.

With parallel.pp > 1 each rank holds one pipeline stage (glm130b.pipeline.PipelineRunner, under the
full model's parameter names): a step's micro-batches (this dp rank's share) go through the schedule
as one batch cut into parallel.pp_microbatches pieces, the loss exists on the last stage and is
broadcast from there, validation passes activations stage to stage, and the export gathers the
stages' weights to rank 0. The share must be the same size every step (no batch ramp-up) and
fp16's loss scaling is not supported there (use bf16).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from glm130b.checkpoint.model_dir import WEIGHTS_FILE, save_model
from glm130b.core.errors import ConfigError, GLMError
from glm130b.data.prepare import TokenCorpus
from glm130b.distributed.parallelize import (
    ParallelConfig,
    apply_activation_checkpointing,
    build_mesh,
    clip_grad_norm_,
    full_state_dict,
    init_distributed,
    load_checkpoint,
    parallelize,
    save_checkpoint,
    to_official_keys,
)
from glm130b.distributed.pipeline import PipelineRunner
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.model.initialization import initialize_glm
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.loss import masked_lm_loss
from glm130b.objective.sampler import GLMBatchSampler
from glm130b.objective.samples import ObjectiveConfig, load_mip_pairs
from glm130b.tokenizer.tokenizers import load_tokenizer
from glm130b.train.config import TrainConfig
from glm130b.train.metrics import MetricsLog, format_record
from glm130b.train.optim import (
    DynamicLossScaler,
    build_optimizer,
    embedding_grad_scale,
    global_batch_size_at,
    learning_rate,
)
from glm130b.train.report import plot_loss_curve
from glm130b.train.spike_guard import SpikeGuard

STATE_FILE = "trainer_state.pt"
DCP_METADATA = ".metadata"  # the file that marks a torch.distributed.checkpoint directory
CHECKPOINT_PREFIX = "step_"
# Dense bf16/fp16 tensor-core peak of one device (datasheet, SXM parts), for MFU.
PEAK_FLOPS_BY_DEVICE = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(GLMError):
    """The spike guard rolled back more often than allowed."""


class BatchSource(Protocol):
    def micro_batch(self, index: int) -> TrainingBatch: ...


# ---------------------------------------------------------------------------------- FLOPs and MFU
def training_flops_per_token(config: GLMConfig, sequence_length: int) -> float:
    """Model FLOPs of one trained token (forward + backward, no recomputation counted):

        6 * (N_matmul) + 12 * layers * hidden * sequence_length

    N_matmul = the parameters of the non-embedding matrices plus vocab x hidden for the output
    head (the embedding lookup is free, the logit matmul is not); 6 = 2 (multiply-add) x 3
    (forward, two backward matmuls). The second term is attention scores and weighted sum,
    2 matmuls x 2 x 3 over the full sequence, as dense kernels compute them (PaLM's formula).
    """
    C, F, L = config.hidden_size, config.inner_hidden_size, config.num_layers
    branches = 2 if config.ffn == "geglu" else 1
    per_layer = 3 * C * C + C * C + branches * F * C + F * C
    matmul_params = L * per_layer + config.vocab_size * C
    return 6.0 * matmul_params + 12.0 * L * C * sequence_length


def device_peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS_BY_DEVICE.items():
            if key in name:
                return peak
    return None  # CPU and unknown GPUs: MFU not printed


# ---------------------------------------------------------------------------------- model, step, eval
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model_and_optimizer(config: TrainConfig, model_config: GLMConfig,
                              device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The single-process model (GLM-130B init, seeded) and its AdamW; under torchrun
    glm130b.parallel.build_parallel_model_and_optimizer takes its place."""
    with torch.device(device):
        model = GLM(model_config)
    initialize_glm(model, seed=config.seed)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model, build_optimizer(model, config)


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast (weights stay fp32: the fp32 master weights); fp32 runs without it.
    The softmax stays fp32: SDPA's fused kernels accumulate it in fp32 and the reference backend
    casts scores to fp32 (the change that made GLM-130B converge)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def batch_loss(model: torch.nn.Module, batch: TrainingBatch, precision: str) -> torch.Tensor:
    """The GLM loss of one micro-batch (mean over its scored tokens, fp32)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    with autocast(precision, device):
        logits = model(batch.input_ids, batch.position_ids, batch.attention_mask(), check_inputs=False)
    return masked_lm_loss(logits, batch.targets, batch.loss_mask)


def forward_backward(model: torch.nn.Module, micro_batches: list[TrainingBatch], precision: str,
                     loss_scale: float = 1.0, dp_group=None) -> float:
    """Accumulate the gradient of the global batch's loss (times loss_scale) over its
    micro-batches; returns the loss: the mean over all scored tokens of the global batch.

    dp_group: the data-parallel group when each rank holds only its share of the micro-batches.
    Every share is then weighted by the scored tokens of the WHOLE global batch (one all-reduce of
    the count per step: parallel.data_parallel_loss does the same per micro-batch, but accumulation
    needs the count of the step), and multiplied by the dp size, which FSDP2's gradient averaging
    over dp ranks divides out again. The returned loss is summed over the ranks: the number a
    single process prints for the same batch.
    """
    counts = torch.tensor([float(sum(b.num_target_tokens for b in micro_batches))])
    dp_size = 1
    if dp_group is not None:
        dp_size = dist.get_world_size(dp_group)
        counts = _all_reduce_sum(counts, dp_group)
    total_targets = counts.item() or 1
    loss_sum = 0.0
    for batch in micro_batches:
        loss = batch_loss(model, batch, precision)
        share = batch.num_target_tokens / total_targets  # token-weighted accumulation
        (loss * (share * dp_size * loss_scale)).backward()
        loss_sum += loss.item() * share
    if dp_group is not None:
        loss_sum = _all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64), dp_group).item()
    return loss_sum


def _all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group`; on the rank's CUDA device for nccl, which reduces only CUDA tensors."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    values = values.to(device)
    dist.all_reduce(values, group=group)
    return values.cpu()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[TrainingBatch], precision: str) -> float:
    """Mean loss over the scored tokens of `batches` (no dropout)."""
    was_training = model.training
    model.eval()
    losses = [(batch_loss(model, batch, precision).item(), batch.num_target_tokens) for batch in batches]
    model.train(was_training)
    return sum(loss * n for loss, n in losses) / max(1, sum(n for _, n in losses))


# ---------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """What a checkpoint restores, besides model, optimizer and RNG."""

    step: int = 0
    samples: int = 0          # samples whose update was applied: the schedule's clock
    data_position: int = 0    # index of the next micro-batch to draw
    # Kept across rollbacks (the guard's memory of what it already did):
    skipped: list[list[int]] = field(default_factory=list)  # [start, end) micro-batch ranges never used
    lr_factor: float = 1.0
    embedding_grad_scale_factor: float = 1.0
    rollbacks: int = 0


class Trainer:
    def __init__(self, config: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_source: BatchSource, valid_batches: dict[str, list[TrainingBatch]] | None = None,
                 show_progress: bool = True, mesh=None):
        """valid_batches: a fixed set of validation batches per name (e.g. per language).
        mesh: the [pp, dp, tp] DeviceMesh of a distributed run (glm130b.parallel.build_mesh) whose
        parallelized model and optimizer these are; None = one process."""
        self.config, self.model, self.optimizer = config, model, optimizer
        self.mesh = mesh
        self.dp_group = mesh["dp"].get_group() if mesh is not None else None
        self.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        self.dp_size = mesh["dp"].size() if mesh is not None else 1
        self.is_main = mesh is None or dist.get_rank() == 0
        # build_run_model_and_optimizer hands a pipeline stage over with its runner attached
        self.runner = getattr(model, "pipeline_runner", None)
        share = config.micro_batch_size * self.dp_size  # sequences of one micro-batch on every dp rank
        for name in ("global_batch_size", "rampup_start_batch_size"):
            value = getattr(config, name)
            if mesh is not None and value is not None and value % share:
                raise ConfigError(f"{name} {value} is not a multiple of micro_batch_size x dp = {share}: every "
                                  f"data-parallel rank takes whole micro-batches of each global batch; pick a "
                                  f"multiple of {share}")
        if self.runner is not None:
            self._check_pipeline_config(config)
        self.train_source, self.valid_batches = train_source, valid_batches or {}
        self.device = next(model.parameters()).device
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.state = RunState()
        self.scaler = DynamicLossScaler.from_config(config)
        self.guard = SpikeGuard(config.spike_guard)
        self.show_progress = show_progress and self.is_main
        glm = model.config
        self.flops_per_token = training_flops_per_token(glm, config.sequence_length)
        self.peak_flops = device_peak_flops(self.device, config.peak_flops)
        self.metrics = MetricsLog(self.out_dir / "metrics", config.metrics_format, config.tensorboard,
                                  enabled=self.is_main)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Run to train_samples (resuming when allowed); returns the last validation losses."""
        cfg = self.config
        # dp ranks differ in seed (their shares are other data); the tp ranks of one dp group share
        # it, so that dropout on their replicated activations keeps the replicas identical.
        torch.manual_seed(cfg.seed + self.dp_rank)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "train_config.yaml")
            for unfinished in self.checkpoint_dir.glob(".tmp-*"):  # saves cut short by a kill
                shutil.rmtree(unfinished, ignore_errors=True)
        self._barrier()
        latest = latest_checkpoint(self.checkpoint_dir)
        if latest is not None and not cfg.resume:
            raise GLMError(f"{self.checkpoint_dir} holds checkpoints of an earlier run; set resume: true to "
                           "continue it, or pick another out_dir")
        if latest is not None:
            self._load(latest)
            if self.show_progress:
                tqdm.write(f"resumed from {latest} (step {self.state.step})")
        elif cfg.spike_guard.enabled:
            self.save_checkpoint()  # a rollback target before the first step
        self.model.train()
        with tqdm(total=cfg.train_samples, initial=min(self.state.samples, cfg.train_samples), unit="sample",
                  disable=not self.show_progress, dynamic_ncols=True) as progress:
            while self.state.samples < cfg.train_samples:
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
                    self.validate(progress)
                if record["step"] % cfg.checkpoint_every == 0 or done:
                    self.save_checkpoint()
        valid = self.validate()  # the final model's (also when an already finished run is resumed)
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
        micro_batches = [self.train_source.micro_batch(i) for i in indices[self.dp_rank::self.dp_size]]
        lr = learning_rate(state.samples, cfg) * state.lr_factor
        alpha = embedding_grad_scale(state.step, cfg) * state.embedding_grad_scale_factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.embedding_grad_scale = alpha
        scale = self.scaler.scale if cfg.precision == "fp16" else 1.0

        if self.runner is not None:
            loss = self._pipeline_forward_backward(micro_batches)
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
            if self.mesh is not None:  # rank 0's verdict, so that every rank rolls back or none does
                verdict = [reason]
                dist.broadcast_object_list(verdict, src=0)
                reason = verdict[0]
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
        # The whole global batch (every dp share is the same shape); MFU per device of the run.
        tokens = sum(b.input_ids.numel() for b in micro_batches) * self.dp_size
        devices = dist.get_world_size() if self.mesh is not None else 1
        record = {"step": state.step, "samples": state.samples, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "loss_scale": scale, "batch_size": size,
                  "embedding_grad_scale": alpha, "tokens_per_s": tokens / seconds,
                  "mfu": (self.flops_per_token * tokens / seconds / self.peak_flops / devices)
                  if self.peak_flops else None,
                  "skipped_update": overflow}
        self.metrics.write("train", record)
        return record

    def validate(self, progress: tqdm | None = None) -> dict[str, float]:
        if not self.valid_batches:
            return {}
        evaluate_batches = self._pipeline_evaluate if self.runner is not None else (
            lambda batches: evaluate(self.model, batches, self.config.precision))
        losses = {name: evaluate_batches(batches) for name, batches in self.valid_batches.items()}
        self.metrics.write("valid", {"step": self.state.step, **{f"loss_{k}": v for k, v in losses.items()}})
        if self.show_progress:
            (progress or tqdm).write(f"step {self.state.step} validation " +
                                     ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
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

    # ------------------------------------------------------------------ pipeline parallel
    def _check_pipeline_config(self, config: TrainConfig) -> None:
        pcfg = self.runner.pcfg  # dp resolved
        if config.precision == "fp16":
            raise ConfigError("precision fp16 with parallel.pp > 1: the pipeline schedule has no loss scaling; "
                              "use precision bf16 (or fp32)")
        if config.rampup_start_batch_size not in (None, config.global_batch_size):
            raise ConfigError(f"rampup_start_batch_size {config.rampup_start_batch_size} with parallel.pp > 1: the "
                              "pipeline stages fix their activation shapes at the first step, so every step needs "
                              "the same batch size; set rampup_start_batch_size: null")
        share = config.global_batch_size // pcfg.dp  # sequences of one dp rank per step
        if share % pcfg.microbatches:
            raise ConfigError(f"global_batch_size {config.global_batch_size} / dp {pcfg.dp} = {share} sequences per "
                              f"pipeline step do not split into parallel.pp_microbatches {pcfg.microbatches} "
                              f"equal pieces; pick pp_microbatches dividing {share}")

    def _pipeline_forward_backward(self, micro_batches: list[TrainingBatch]) -> float:
        """Forward and backward of this dp rank's share through the pipeline schedule (the share
        as one batch, cut into pp_microbatches pieces; the loss is normalised by the global count
        of scored tokens, as in forward_backward); returns the global batch loss on every rank."""
        batch = TrainingBatch(**{f.name: torch.cat([getattr(b, f.name) for b in micro_batches])
                                 for f in dataclasses.fields(TrainingBatch)}).to(self.device)
        with autocast(self.config.precision, self.device):
            loss = self.runner.step(batch)
        return self._from_last_stage(loss)

    def _from_last_stage(self, value: torch.Tensor | float | None) -> float:
        """A number known on the last pipeline stage (e.g. the loss), broadcast to every rank."""
        source = int(self.mesh.mesh[-1, 0, 0])  # the last stage of dp 0, tp 0 ([pp, dp, tp] ranks)
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        buffer = torch.tensor([float(value) if value is not None else 0.0], dtype=torch.float64, device=device)
        dist.broadcast(buffer, src=source)
        return buffer.item()

    @torch.no_grad()
    def _pipeline_evaluate(self, batches: list[TrainingBatch]) -> float:
        """evaluate() through the stages: each receives the previous stage's hidden states
        [B, S, C] (sent in fp32), runs its layers and passes them on; the last scores them."""
        stage, pp_mesh = self.model, self.mesh["pp"]
        group, pp_rank = pp_mesh.get_group(), pp_mesh.get_local_rank()
        was_training = stage.training
        stage.eval()
        loss_sum, count = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            if stage.first:
                x = batch.input_ids
            else:
                x = torch.empty(*batch.input_ids.shape, stage.config.hidden_size, device=self.device)
                dist.recv(x, group=group, group_src=pp_rank - 1)
            with autocast(self.config.precision, self.device):
                out = stage(x, batch.position_ids, batch.attention_mask())
            if stage.last:
                loss_sum += masked_lm_loss(out, batch.targets, batch.loss_mask).item() * batch.num_target_tokens
                count += batch.num_target_tokens
            else:
                dist.send(out.float().contiguous(), group=group, group_dst=pp_rank + 1)
        stage.train(was_training)
        return self._from_last_stage(loss_sum / max(1, count) if stage.last else None)

    # ------------------------------------------------------------------ spike handling
    def roll_back(self, reason: str, spike_indices: list[int]) -> None:
        """Restore the newest checkpoint, never use this step's micro-batches again, and apply
        the guard's lr / alpha factors. Logged as an intervention."""
        guard_cfg, kept = self.config.spike_guard, self.state
        spike_step = kept.step + 1
        if kept.rollbacks >= guard_cfg.max_rollbacks:
            raise TrainingDiverged(
                f"step {spike_step}: {reason}, after {kept.rollbacks} rollbacks already (spike_guard.max_rollbacks); "
                "lower lr, set spike_guard.lr_factor below 1, or check the data")
        target = latest_checkpoint(self.checkpoint_dir)
        if target is None:
            raise TrainingDiverged(f"step {spike_step}: {reason}, and no checkpoint to roll back to in "
                                   f"{self.checkpoint_dir}")
        skipped = kept.skipped + [[i, i + 1] for i in spike_indices]
        lr_factor = kept.lr_factor * guard_cfg.lr_factor
        alpha_factor = kept.embedding_grad_scale_factor * guard_cfg.embedding_grad_scale_factor
        rollbacks = kept.rollbacks + 1
        self._load(target)
        self.state.skipped = _merge_ranges(skipped)
        self.state.lr_factor, self.state.embedding_grad_scale_factor = lr_factor, alpha_factor
        self.state.rollbacks = rollbacks
        intervention = {"step": spike_step, "reason": reason, "rolled_back_to": self.state.step,
                        "skipped_micro_batches": f"{spike_indices[0]}..{spike_indices[-1]}",
                        "lr_factor": lr_factor, "embedding_grad_scale_factor": alpha_factor}
        self.metrics.write("intervention", intervention)
        if self.show_progress:
            tqdm.write(f"spike guard: step {spike_step}: {reason}; rolled back to step {self.state.step}, "
                       f"skipping micro-batches {spike_indices[0]}..{spike_indices[-1]}, lr x{lr_factor:g}, "
                       f"embedding alpha x{alpha_factor:g}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write step_<step> atomically (temporary directory, then rename) and prune old ones."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.state.step:08d}"
        if self.mesh is not None:
            self._save_distributed(final)
            return final
        tmp = self.checkpoint_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(self.model, tmp, metadata={"step": str(self.state.step)})
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"run": asdict(self.state), "optimizer": self.optimizer.state_dict(),
                    "loss_scaler": self.scaler.state_dict(), "spike_guard": self.guard.state_dict(),
                    "rng": rng, "config": self.config.to_dict()}, tmp / STATE_FILE)
        self._publish(tmp, final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename a complete temporary checkpoint into place and prune the oldest."""
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(self.checkpoint_dir)[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _trainer_state(self) -> str:
        """What a checkpoint holds besides model, optimizer and RNG, as JSON text: DCP stores it as
        one object, whatever its lists' lengths."""
        return json.dumps({"run": asdict(self.state), "loss_scaler": self.scaler.state_dict(),
                           "spike_guard": self.guard.state_dict(), "config": self.config.to_dict()})

    def _save_distributed(self, final: Path) -> None:
        """Every rank writes its shards into one temporary directory (same name on every rank);
        rank 0 renames it after all have finished. Each rank's RNG is stored under its own key."""

        tmp = self.checkpoint_dir / f".tmp-{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        extra = {"trainer": self._trainer_state(), f"rng_rank{dist.get_rank()}": self._rng_state()}
        save_checkpoint(tmp, self.model, self.optimizer, extra=extra, flatten_optimizer=self.runner is not None)
        self._barrier()
        if self.is_main:
            self._publish(tmp, final)
        self._barrier()

    def _load(self, directory: Path) -> None:
        distributed_checkpoint = (directory / DCP_METADATA).is_file()
        if distributed_checkpoint != (self.mesh is not None):
            written, needed = (("by a torchrun launch", "under torchrun (--nproc_per_node 1 works)")
                               if distributed_checkpoint else ("by a single-process run", "with one process"))
            raise GLMError(f"{directory} was written {written}; resume it {needed}, or start a new out_dir")
        if self.mesh is not None:
            self._load_distributed(directory)
            return
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        weights = load_file(str(directory / WEIGHTS_FILE), device=str(self.device))
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.guard.load_state_dict(state["spike_guard"])
        self.state = RunState(**state["run"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _load_distributed(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp


        rng_key = f"rng_rank{dist.get_rank()}"
        saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        wanted = {"trainer": ""} | ({rng_key: ""} if f"extra.{rng_key}" in saved else {})
        extra = load_checkpoint(directory, self.model, self.optimizer, extra=wanted)
        state = json.loads(extra["trainer"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.guard.load_state_dict(state["spike_guard"])
        self.state = RunState(**state["run"])
        if rng_key in wanted:  # this rank existed when the checkpoint was written: its RNG comes back
            rng = json.loads(extra[rng_key])
            torch.set_rng_state(torch.tensor(rng["cpu"], dtype=torch.uint8))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
        else:  # a rank the saving run did not have: a fresh stream of its own
            torch.manual_seed(self.config.seed + self.state.step + self.dp_rank)

    def _rng_state(self) -> str:
        """This rank's RNG (CPU, and its own CUDA device), as JSON text."""
        rng = {"cpu": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state().tolist()
        return json.dumps(rng)

    def _barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are hidden)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


# ---------------------------------------------------------------------------------- from a config
class CorpusSubset:
    """Some sources of a corpus with their weights renormalised: the corpus interface that
    GLMBatchSampler reads, e.g. one language of a bilingual validation corpus."""

    def __init__(self, corpus, sources: list[str]):
        self.corpus, self.sources = corpus, list(sources)
        total = sum(corpus.weights[s] for s in self.sources)
        self.weights = {s: corpus.weights[s] / total for s in self.sources}

    def num_tokens(self, source: str) -> int:
        return self.corpus.num_tokens(source)

    def window(self, source: str, start: int, length: int):
        return self.corpus.window(source, start, length)


def sources_by_language(corpus) -> dict[str, list[str]]:
    languages: dict[str, list[str]] = {}
    for name, state in corpus.manifest["sources"].items():
        languages.setdefault(state["lang"], []).append(name)
    return languages


def validation_objective(objective):
    """Validation scores [gMASK] samples only: the loss of a left-to-right suffix given its
    prefix, comparable across languages and with a unigram model of the same tokens."""
    return dataclasses.replace(objective, gmask_share=1.0, mip_share=0.0)


def build_data(config: TrainConfig, tokenizer) -> tuple[BatchSource, dict[str, list[TrainingBatch]]]:
    """The training sampler over `config.corpus` and fixed validation batches per language of
    `config.valid_corpus` (glm130b.data, glm130b.sampler)."""

    objective = ObjectiveConfig.for_sequence_length(config.sequence_length)
    mip_pairs = load_mip_pairs(config.mip_data, tokenizer) if config.mip_data else None
    if mip_pairs is None:  # no instruction data: the self-supervised mix only
        objective = dataclasses.replace(objective, mip_share=0.0)
    position_encoding = config.model_config().position_encoding
    corpus = TokenCorpus(config.corpus)
    corpus.check_tokenizer(tokenizer)
    train = GLMBatchSampler(corpus, objective, tokenizer.specials, config.micro_batch_size, config.seed,
                            mip_pairs=mip_pairs, position_encoding=position_encoding)
    valid: dict[str, list[TrainingBatch]] = {}
    if config.valid_corpus:
        held_out = TokenCorpus(config.valid_corpus)
        held_out.check_tokenizer(tokenizer)
        for language, names in sources_by_language(held_out).items():
            sampler = GLMBatchSampler(CorpusSubset(held_out, names), validation_objective(objective),
                                      tokenizer.specials, config.micro_batch_size, config.seed,
                                      position_encoding=position_encoding)
            valid[language] = sampler.validation_batches(config.eval_batches)
    return train, valid


@dataclass
class PretrainResult:
    valid_losses: dict[str, float]
    valid_batches: dict[str, list[TrainingBatch]]
    model_dir: Path       # the trained model, in the glm130b.checkpoint format
    metrics_dir: Path
    loss_curve: Path | None


def run_pretraining(config: TrainConfig, show_progress: bool = True) -> PretrainResult:
    """Everything `glm130b pretrain` does: data, model, training, export, loss curve."""

    if not config.corpus or not config.tokenizer:
        raise GLMError("set corpus (a prepared corpus directory) and tokenizer (its tokenizer directory), "
                       "in the config file or as --corpus DIR --tokenizer DIR")
    tokenizer = load_tokenizer(config.tokenizer)
    model_config = config.model_config()
    if tokenizer.vocab_size > model_config.vocab_size:
        raise GLMError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model_config.vocab_size} "
                       f"rows; set model.vocab_size to at least {tokenizer.vocab_size}")
    train_source, valid_batches = build_data(config, tokenizer)
    model, optimizer, mesh = build_run_model_and_optimizer(config, model_config)
    trainer = Trainer(config, model, optimizer, train_source, valid_batches, show_progress=show_progress, mesh=mesh)
    valid = trainer.train()
    model_dir, metrics_dir = Path(config.out_dir) / "model", Path(config.out_dir) / "metrics"
    export_model(trainer, model_dir, metadata={"tokenizer_fingerprint": tokenizer.fingerprint()})
    curve = None
    if trainer.is_main:
        tokenizer.save(model_dir / "tokenizer")
        curve = plot_loss_curve(metrics_dir, Path(config.out_dir) / "loss_curve.png")
    if mesh is not None:
        dist.barrier()  # the export is complete before any rank returns
        dist.destroy_process_group()
    return PretrainResult(valid, valid_batches, model_dir, metrics_dir, curve)


def export_model(trainer: Trainer, directory: Path, metadata: dict[str, str]) -> None:
    """The trained model in the glm130b.checkpoint format (official keys, whole tensors), written
    by rank 0. Collective in a distributed run: every rank takes part in gathering the shards."""
    metadata = {**metadata, "step": str(trainer.state.step)}
    if trainer.mesh is None:
        save_model(trainer.model, directory, metadata=metadata)
        return

    state = _gather_stages(trainer) if trainer.runner is not None else full_state_dict(trainer.model)  # the whole tensors arrive on rank 0 only
    if trainer.is_main:
        with torch.device("meta"):
            plain = GLM(trainer.model.config)
        plain.load_state_dict(state, assign=True)
        save_model(plain, directory, metadata=metadata)


def _gather_stages(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The whole model's official-key state on rank 0, from the pipeline stages: each stage's full
    tensors (all-gathered over its dp / tp shards), sent by its dp 0, tp 0 rank. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )


    # no cpu_offload: that keeps tensors on global rank 0 only, and every stage's dp 0 / tp 0 needs them
    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    sender = trainer.mesh["dp"].get_local_rank() == 0 and trainer.mesh["tp"].get_local_rank() == 0
    state = to_official_keys({k: v.detach().cpu() for k, v in state.items()}) if sender else {}
    parts = [None] * dist.get_world_size() if trainer.is_main else None
    dist.gather_object(state, parts, dst=0)
    # the tied embedding arrives from the first and the last stage: identical copies
    return {k: v for part in (parts or []) for k, v in part.items()}


def build_parallel_model_and_optimizer(train_config, model_config: GLMConfig, device: torch.device,
                                       pcfg: ParallelConfig, mesh) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The distributed counterpart of glm130b.trainer.build_model_and_optimizer: the same seeded
    GLM-130B init on every rank (so every rank starts from identical full weights), then
    parallelize, then the trainer's AdamW over the (sharded) parameters. For models too large to
    materialise whole per rank, build on the meta device, parallelize, `to_empty` and load a
    checkpoint instead (docs/distributed.md)."""
    with torch.device(device):
        model = GLM(model_config)
    initialize_glm(model, seed=train_config.seed)
    parallelize(model, mesh, pcfg)
    return model, build_optimizer(model, train_config)


def build_run_model_and_optimizer(config: TrainConfig, model_config: GLMConfig):
    """(model, optimizer, mesh) for this launch. One process: build_model_and_optimizer, mesh None.
    Under torchrun (RANK set, whatever the process count): the process group (nccl on CUDA with
    each rank on cuda:LOCAL_RANK, gloo on CPU), the mesh of config.parallel, and the parallelized
    model built from the same seed on every rank."""
    if "RANK" not in os.environ:
        model, optimizer = build_model_and_optimizer(config, model_config, resolve_device(config.device))
        return model, optimizer, None

    device = resolve_device(config.device)
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    pcfg = config.parallel.validate(model_config, dist.get_world_size())
    pcfg = dataclasses.replace(pcfg, activation_checkpointing=pcfg.activation_checkpointing
                               or config.activation_checkpointing)
    mesh = build_mesh(pcfg, device.type)
    if pcfg.pp > 1:
        return (*build_pipeline_stage_and_optimizer(config, model_config, device, pcfg, mesh), mesh)
    model, optimizer = build_parallel_model_and_optimizer(config, model_config, device, pcfg, mesh)
    return model, optimizer, mesh


def build_pipeline_stage_and_optimizer(config: TrainConfig, model_config: GLMConfig, device: torch.device,
                                       pcfg, mesh) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """This rank's pipeline stage of the seeded GLM (the same full init on every rank, then sliced
    and parallelized by glm130b.pipeline.PipelineRunner) and AdamW over the stage's parameters.
    The runner travels as `stage.pipeline_runner`, where the Trainer finds it."""

    with torch.device(device):
        model = GLM(model_config)
    initialize_glm(model, seed=config.seed)
    runner = PipelineRunner(model, mesh, pcfg, device)
    stage = runner.stage_module
    stage.pipeline_runner = runner
    return stage, build_optimizer(stage, config)

