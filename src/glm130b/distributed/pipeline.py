"""Pipeline parallel through torch.distributed.pipelining: GLM stages, the schedule, tied embeddings.

A stage is a slice of the GLM that keeps the full model's parameter names
(`transformer.layers.17...`), so DCP checkpoints of a pipelined run load into any other layout.
The first stage embeds; the last applies the final LayerNorm and the tied output head, for which
it holds its own copy of the word embedding (as Megatron and the GLM-130B training code do) whose
gradient is summed with the first stage's after every backward (`sync_tied_embedding_grads`), so
both copies take identical optimizer steps.

The loss is the GLM mean over the scored tokens of the whole batch. Each microbatch's loss is its
token sum divided by the global count, and the schedule does not rescale (scale_grads=False), so the
accumulated gradient is exactly the full-batch gradient however the tokens fall into microbatches.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm130b.core.errors import ConfigError
from glm130b.distributed.parallelize import ParallelConfig, clip_grad_norm_, parallelize
from glm130b.model.glm import GLM, RotaryAngles, shrink_gradient
from glm130b.objective.batch import TrainingBatch

IGNORE = -100  # cross_entropy's ignore_index: unscored positions


def stage_layer_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """[start, end) layers per stage, as even as possible; the spare layers go to the middle
    stages, since the first and last stages also carry the embedding and the output head."""
    if pp > num_layers:
        raise ConfigError(f"pp {pp} exceeds num_layers {num_layers}: every stage needs a layer")
    base, spare = divmod(num_layers, pp)
    order = sorted(range(pp), key=lambda s: (s in (0, pp - 1), abs(s - (pp - 1) / 2)))
    counts = [base + (1 if s in order[:spare] else 0) for s in range(pp)]
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


class GLMStage(nn.Module):
    """Layers [start, end) of a GLM, under the full model's parameter names."""

    def __init__(self, model: GLM, start: int, end: int, first: bool, last: bool):
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        self.embedding_grad_scale = model.embedding_grad_scale
        self.transformer = nn.Module()
        if first or (last and model.config.tie_word_embeddings):
            self.transformer.word_embeddings = model.transformer.word_embeddings
            if not first:  # the last stage's own copy of the tied weight (synced by gradient)
                self.transformer.word_embeddings = _copy_embedding(model.transformer.word_embeddings)
        # ModuleDict keyed by the global index keeps the names `transformer.layers.{i}`.
        self.transformer.layers = nn.ModuleDict({str(i): model.transformer.layers[i] for i in range(start, end)})
        self.layer_offset = start
        if last:
            self.transformer.final_layernorm = model.transformer.final_layernorm
            if not model.config.tie_word_embeddings:
                self.lm_head = model.lm_head

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.first:  # x = input_ids [B, S]
            x = shrink_gradient(self.transformer.word_embeddings(x), self.embedding_grad_scale)  # [B, S, C]
        rotary = RotaryAngles.build(position_ids, self.config)
        for name, layer in self.transformer.layers.items():
            x = layer(x, rotary, attention_mask, None, int(name))
        if not self.last:
            return x
        x = self.transformer.final_layernorm(x)
        weight = (shrink_gradient(self.transformer.word_embeddings.weight, self.embedding_grad_scale)
                  if self.config.tie_word_embeddings else self.lm_head.weight)
        return F.linear(x, weight)  # [B, S, vocab]


def _copy_embedding(embedding: nn.Embedding) -> nn.Embedding:
    copy = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device,
                        dtype=embedding.weight.dtype)
    copy.weight = nn.Parameter(embedding.weight.detach().clone())
    return copy


def tied_embedding_group(mesh):
    """The process group joining first and last pipeline stage of this rank's (dp, tp) column, or
    None if this rank holds no tied copy. Collective: every rank must call it."""
    ranks = mesh.mesh  # [pp, dp, tp] of global ranks
    pp = ranks.shape[0]
    mine, me = None, dist.get_rank()
    if pp == 1:
        return None
    for d in range(ranks.shape[1]):
        for t in range(ranks.shape[2]):
            pair = [int(ranks[0, d, t]), int(ranks[pp - 1, d, t])]
            group = dist.new_group(pair)
            if me in pair:
                mine = group
    return mine


def sync_tied_embedding_grads(stage: GLMStage, group) -> None:
    """Sum the tied embedding's gradient over its first- and last-stage copies."""
    if group is None or not stage.config.tie_word_embeddings:
        return
    grad = stage.transformer.word_embeddings.weight.grad
    if grad is None:
        grad = stage.transformer.word_embeddings.weight.grad = torch.zeros_like(stage.transformer.word_embeddings.weight)
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    dist.all_reduce(local, group=group)


class PipelineRunner:
    """This rank's stage and schedule. `step(batch)` runs forward and backward over all
    microbatches (no optimizer step) and returns the batch loss on the last stage, else None.
    Use `runner.stage_module.parameters()` for the optimizer and checkpoints."""

    def __init__(self, model: GLM, mesh, pcfg: ParallelConfig, device: torch.device | str = "cpu"):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
        )

        pcfg = pcfg.validate(model.config, mesh.size())
        pp_rank = mesh["pp"].get_local_rank()
        start, end = stage_layer_ranges(model.config.num_layers, pcfg.pp)[pp_rank]
        self.pcfg, self.mesh = pcfg, mesh
        self.stage_module = GLMStage(model, start, end, pp_rank == 0, pp_rank == pcfg.pp - 1)
        # The same TP / checkpointing / compile / FSDP2 steps as an unpipelined model, per stage.
        parallelize(self.stage_module, mesh, pcfg)
        self.tied_group = tied_embedding_group(mesh)
        self.stage = PipelineStage(self.stage_module, pp_rank, pcfg.pp, torch.device(device),
                                   group=mesh["pp"].get_group())
        self._count = torch.tensor(1.0)
        schedule = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[pcfg.pp_schedule]
        self.schedule = schedule(self.stage, pcfg.microbatches, loss_fn=self._loss, scale_grads=False)

    def norm_parameters(self) -> list[torch.Tensor]:
        """The parameters that count in the global gradient norm: all of this stage's, except the
        last stage's copy of the tied embedding (its gradient equals the first stage's)."""
        skip = None
        if self.stage_module.last and not self.stage_module.first and self.stage_module.config.tie_word_embeddings:
            skip = self.stage_module.transformer.word_embeddings.weight
        return [p for p in self.stage_module.parameters() if p is not skip]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over the whole model (all stages); call after step() on every rank."""

        norm = clip_grad_norm_(self.norm_parameters(), max_norm, pp_group=self.mesh["pp"].get_group())
        if self.tied_group is not None and not self.stage_module.first:  # the skipped copy too
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            grad = self.stage_module.transformer.word_embeddings.weight.grad
            if grad is not None:
                grad.mul_(coef.item() if hasattr(grad, "to_local") else coef.to(grad.device))
        return norm

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # token sum / global token count; x dp to undo FSDP2's gradient averaging over dp
        summed = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return summed / self._count * self.pcfg.dp

    def step(self, batch: TrainingBatch) -> torch.Tensor | None:
        mask = batch.attention_mask()
        count = batch.loss_mask.sum().float().reshape(())
        if self.pcfg.dp > 1:
            dist.all_reduce(count, group=self.mesh["dp"].get_group())
        self._count = count.clamp(min=1.0)
        kwargs: dict[str, Any] = dict(position_ids=batch.position_ids, attention_mask=mask)
        if self.stage.is_last:
            losses: list[torch.Tensor] = []
            targets = batch.targets.masked_fill(batch.loss_mask == 0, IGNORE)
            self.schedule.step(target=targets, losses=losses, **kwargs)
        elif self.stage.is_first:
            self.schedule.step(batch.input_ids, **kwargs)
        else:
            self.schedule.step(**kwargs)
        sync_tied_embedding_grads(self.stage_module, self.tied_group)
        if not self.stage.is_last:
            return None
        # the logged loss: the global mean (undo the x dp of the backward scaling)
        loss = torch.stack([l.detach() for l in losses]).sum() / self.pcfg.dp
        if self.pcfg.dp > 1:
            dist.all_reduce(loss, group=self.mesh["dp"].get_group())
        return loss


def pipeline_step(model: GLM, mesh, pcfg: ParallelConfig, batch: TrainingBatch, return_grads: bool = False
                  ) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """One forward+backward of `batch` through the pipeline (a helper for tests and quick checks):
    the loss (last stage, else None), the whole model's gradient norm (every rank) and, with
    return_grads, this stage's gradients by parameter name."""
    runner = PipelineRunner(model, mesh, pcfg)
    loss = runner.step(batch)
    norm = runner.clip_grad_norm_(math.inf)  # measures only: inf clips nothing
    grads = {}
    if return_grads:
        for name, p in runner.stage_module.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return loss, norm, grads
