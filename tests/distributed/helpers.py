"""Helpers of the distributed tests: one pipeline step of a whole model, and the loss of a
data-parallel shard normalised by the global token count."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from glm130b.distributed.parallelize import ParallelConfig
from glm130b.distributed.pipeline import PipelineRunner
from glm130b.model.glm import GLM
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.loss import masked_lm_loss_sum


def pipeline_step(
    model: GLM, mesh, pcfg: ParallelConfig, batch: TrainingBatch, return_grads: bool = False
) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """One forward+backward of `batch` through the pipeline: the loss (on every rank), the whole
    model's gradient norm (every rank) and, with return_grads, this stage's gradients by name."""
    runner = PipelineRunner(model, mesh, pcfg)
    loss = runner.step(batch)
    norm = runner.clip_grad_norm_(math.inf)  # measures only: inf clips nothing
    grads = {}
    if return_grads:
        for name, p in runner.stage_module.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return loss, norm, grads


def data_parallel_loss(logits: torch.Tensor, rows: TrainingBatch, dp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward, loss to log) of one data-parallel shard: the shard's token sum over the
    scored tokens of the WHOLE batch, times dp (FSDP2 averages gradients over dp), and the global
    mean, the number a single process prints for the whole batch."""
    summed = masked_lm_loss_sum(logits, rows.targets, rows.loss_mask)
    totals = torch.stack((summed.detach(), rows.loss_mask.float().sum()))
    dist.all_reduce(totals, group=dp_group)
    count = totals[1].clamp(min=1.0)
    return summed / count * dist.get_world_size(dp_group), totals[0] / count
