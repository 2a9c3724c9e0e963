"""The arithmetic of one training step: autocast, the loss of a micro-batch, forward and backward
of a global batch accumulated from micro-batches (one process, data parallel, or through the
pipeline), and the validation loss."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
import torch.distributed as dist

from glm130b.core.dtypes import DTYPES
from glm130b.distributed.pipeline import PipelineRunner
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.loss import masked_lm_loss, weighted_cross_entropy_sum


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast (weights stay fp32: the fp32 master weights); fp32 runs without it.
    The softmax stays fp32: SDPA's fused kernels accumulate it in fp32 and the reference backend
    casts scores to fp32 (the change that made GLM-130B converge)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def _forward(
    model: torch.nn.Module, batch: TrainingBatch, precision: str, logits_where: torch.Tensor | None = None
) -> tuple[torch.Tensor, TrainingBatch]:
    """Logits [B, S, vocab] of one micro-batch under the run's precision ([N, vocab] at the flat
    positions `logits_where`), and the batch on the model's device."""
    device = next(model.parameters()).device
    mask = batch.compact_mask()  # taken on the host: a prefix-LM plan reads it there without a device sync
    batch = batch.to(device)
    selected = {} if logits_where is None else {"logits_where": logits_where.to(device)}
    with autocast(precision, device):
        return model(batch.input_ids, batch.position_ids, mask, check_inputs=False, **selected), batch


def batch_loss(model: torch.nn.Module, batch: TrainingBatch, precision: str) -> torch.Tensor:
    """The GLM loss of one micro-batch (mean over its scored tokens, fp32)."""
    logits, batch = _forward(model, batch, precision)
    return masked_lm_loss(logits, batch.targets, batch.loss_mask)


def batch_loss_sum(model: torch.nn.Module, batch: TrainingBatch, precision: str) -> torch.Tensor:
    """The summed loss of the scored tokens of one micro-batch (fp32). Only the scored positions
    reach the output layer (found on the host, before the batch moves: no device sync): with a
    third to a half of the tokens scored, the vocabulary projection costs that much less."""
    scored = batch.loss_mask.flatten().nonzero().squeeze(1)
    logits, batch = _forward(model, batch, precision, logits_where=scored)
    scored = scored.to(logits.device)
    return weighted_cross_entropy_sum(logits, batch.targets.flatten()[scored], batch.loss_mask.flatten()[scored])


def forward_backward(
    model: torch.nn.Module, micro_batches: list[TrainingBatch], precision: str, loss_scale: float = 1.0, dp_group=None
) -> float:
    """Accumulate the gradient of the global batch's loss (times loss_scale) over its
    micro-batches; returns the loss: the mean over all scored tokens of the global batch.

    Every micro-batch's token sum is divided by the scored tokens of the whole global batch, so the
    accumulated gradient is the full batch's however the tokens fall into micro-batches. dp_group:
    the data-parallel group when each rank holds only its share of the micro-batches; the count is
    then all-reduced over it once a step, and the loss multiplied by the dp size, which FSDP2's
    gradient averaging over dp ranks divides out again. The returned loss is summed over the ranks:
    the number a single process prints for the same batch.
    """
    counts = torch.tensor([float(sum(b.num_target_tokens for b in micro_batches))])
    dp_size = 1
    if dp_group is not None:
        dp_size = dist.get_world_size(dp_group)
        counts = all_reduce_sum(counts, dp_group)
    total_targets = counts.item() or 1
    sums = []
    for batch in micro_batches:
        summed = batch_loss_sum(model, batch, precision)
        (summed * (dp_size * loss_scale / total_targets)).backward()
        sums.append(summed.detach())
    loss_sum = torch.stack(sums).double().sum().reshape(1).cpu()  # the step's one host sync
    if dp_group is not None:
        loss_sum = all_reduce_sum(loss_sum, dp_group)
    return loss_sum.item() / total_targets


def all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
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
    loss_sum = sum(batch_loss_sum(model, batch, precision).item() for batch in batches)
    model.train(was_training)
    return loss_sum / max(1, sum(batch.num_target_tokens for batch in batches))


# ---------------------------------------------------------------------------------- pipeline parallel
def concatenate(micro_batches: list[TrainingBatch]) -> TrainingBatch:
    """The micro-batches as one batch (rows in order)."""
    return TrainingBatch(
        **{f.name: torch.cat([getattr(b, f.name) for b in micro_batches]) for f in dataclasses.fields(TrainingBatch)}
    )


def pipeline_forward_backward(runner: PipelineRunner, micro_batches: list[TrainingBatch], precision: str) -> float:
    """forward_backward through the pipeline schedule: this dp rank's share as one batch, which the
    schedule cuts into parallel.pp_microbatches pieces (the loss normalised by the global count of
    scored tokens, as in forward_backward); returns the global batch loss on every rank."""
    with autocast(precision, runner.device):
        return runner.step(concatenate(micro_batches))  # the runner moves it to its device


def pipeline_evaluate(runner: PipelineRunner, batches: list[TrainingBatch], precision: str) -> float:
    """evaluate() through the stages (PipelineRunner.evaluate); the loss on every rank."""
    with autocast(precision, runner.device):
        return runner.evaluate(batches)
