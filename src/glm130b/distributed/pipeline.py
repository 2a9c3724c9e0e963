"""Pipeline parallel through torch.distributed.pipelining: GLM stages, the schedule, tied embeddings.

A stage is the GLM itself with the modules of other stages set to None, which GLM.forward skips
(torchtitan's passthrough), so it keeps the full model's parameter names and DCP checkpoints load
into any other layout. The last stage keeps its own copy of a tied embedding for the output head,
synced by gradient; each microbatch's loss is its token sum over the global token count
(docs/distributed.md, Pipeline parallel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from glm130b.core.errors import ConfigError
from glm130b.distributed.parallelize import ParallelConfig, clip_grad_norm_, parallelize
from glm130b.model.glm import GLM
from glm130b.objective.batch import TrainingBatch
from glm130b.objective.loss import masked_lm_loss_sum


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


def pipeline_stage(model: GLM, start: int, end: int, first: bool, last: bool) -> GLM:
    """Make `model` the stage holding layers [start, end), in place, and return it: the other
    layers become None (the rest keep their global index and names), the first stage keeps the
    embedding, the last the final LayerNorm and the head. With tied embeddings the last stage also
    keeps its word embedding, the output head's weight: a copy of the first stage's on another
    rank (as in Megatron and the GLM-130B training code), kept equal by sync_tied_embedding_grads."""
    transformer = model.transformer
    for i in range(len(transformer.layers)):
        if not start <= i < end:
            transformer.layers[i] = None
    if not first and not (last and model.config.tie_word_embeddings):
        transformer.word_embeddings = None
    if not last:
        transformer.final_layernorm = None
        if not model.config.tie_word_embeddings:
            model.lm_head = None
    return model


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


def sync_tied_embedding_grads(stage: GLM, group) -> None:
    """Sum the tied embedding's gradient over its first- and last-stage copies."""
    if group is None or not stage.config.tie_word_embeddings:
        return
    weight = stage.transformer.word_embeddings.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    local = weight.grad.to_local() if hasattr(weight.grad, "to_local") else weight.grad
    dist.all_reduce(local, group=group)


class PipelineRunner:
    """This rank's stage and schedule. `step(batch)` runs forward and backward over all
    microbatches (no optimizer step) and returns the batch loss; `evaluate(batches)` the
    validation loss. Use `runner.stage_module.parameters()` for the optimizer and checkpoints.
    `pcfg.pp_microbatches` must be filled in (ParallelConfig.with_microbatches)."""

    def __init__(self, model: GLM, mesh, pcfg: ParallelConfig, device: torch.device | str = "cpu"):
        # deferred: importing torch.distributed.pipelining takes ~0.5 s (see parallelize.py)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        pcfg = pcfg.validate(model.config, mesh.size())
        pp_rank = mesh["pp"].get_local_rank()
        start, end = stage_layer_ranges(model.config.num_layers, pcfg.pp)[pp_rank]
        self.pcfg, self.mesh, self.device = pcfg, mesh, torch.device(device)
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pcfg.pp - 1
        self.stage_module = pipeline_stage(model, start, end, self.is_first, self.is_last)
        # The same TP / checkpointing / compile / FSDP2 steps as an unpipelined model, per stage.
        parallelize(self.stage_module, mesh, pcfg)
        self.tied_group = tied_embedding_group(mesh)
        self.stage = PipelineStage(self.stage_module, pp_rank, pcfg.pp, self.device, group=mesh["pp"].get_group())
        self._count = torch.tensor(1.0)
        schedule = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[pcfg.pp_schedule]
        self.schedule = schedule(self.stage, pcfg.microbatches, loss_fn=self._loss, scale_grads=False)

    def _tied_copy(self) -> nn.Parameter | None:
        """The last stage's copy of the tied embedding (its gradient equals the first stage's)."""
        if self.is_last and not self.is_first and self.stage_module.config.tie_word_embeddings:
            return self.stage_module.transformer.word_embeddings.weight
        return None

    def norm_parameters(self) -> list[torch.Tensor]:
        """The parameters that count in the global gradient norm: all of this stage's, except the
        last stage's copy of the tied embedding."""
        skip = self._tied_copy()
        return [p for p in self.stage_module.parameters() if p is not skip]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over the whole model (all stages); call after step() on every rank."""
        norm = clip_grad_norm_(self.norm_parameters(), max_norm, pp_group=self.mesh["pp"].get_group())
        copy = self._tied_copy()
        if copy is not None and copy.grad is not None:  # the copy left out of the norm is clipped alike
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            copy.grad.mul_(coef.item() if hasattr(copy.grad, "to_local") else coef.to(copy.grad.device))
        return norm

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # target [b, S, 2]: this microbatch's targets and loss mask (step packs them so that the
        # schedule splits both like the inputs). Token sum / global token count; x dp to undo
        # FSDP2's gradient averaging over dp.
        summed = masked_lm_loss_sum(logits, target[..., 0], target[..., 1])
        return summed / self._count * self.pcfg.dp

    def step(self, batch: TrainingBatch) -> float:
        """Forward and backward of `batch` (this dp rank's share of the global batch, on the host or
        the device) through the schedule; returns the loss of the global batch (the mean over its
        scored tokens) on every rank."""
        mask = batch.compact_mask()  # before the move: a prefix-LM plan reads it on the host
        batch = batch.to(self.device)
        count = batch.loss_mask.sum().float().reshape(())
        if self.pcfg.dp > 1:
            dist.all_reduce(count, group=self.mesh["dp"].get_group())
        self._count = count.clamp(min=1.0)
        # a later stage's input is hidden states, not ids; the schedule splits the CompactMask's tensors
        kwargs: dict[str, Any] = dict(position_ids=batch.position_ids, attention_mask=mask, check_inputs=False)
        inputs = (batch.input_ids,) if self.is_first else ()
        losses: list[torch.Tensor] = []
        if self.is_last:
            target = torch.stack((batch.targets, batch.loss_mask.long()), dim=-1)  # loss_mask is 0/1
            self.schedule.step(*inputs, target=target, losses=losses, **kwargs)
        else:
            self.schedule.step(*inputs, **kwargs)
        sync_tied_embedding_grads(self.stage_module, self.tied_group)
        loss = None
        if self.is_last:  # the global mean: undo the x dp of the backward scaling, sum over dp
            loss = torch.stack([mb.detach() for mb in losses]).sum() / self.pcfg.dp
            if self.pcfg.dp > 1:
                dist.all_reduce(loss, group=self.mesh["dp"].get_group())
        return self.from_last_stage(loss)

    @torch.no_grad()
    def evaluate(self, batches: list[TrainingBatch]) -> float:
        """Mean loss over the scored tokens of `batches` (no dropout), on every rank: each stage
        receives the previous stage's hidden states [B, S, C] (sent in fp32), runs its layers and
        passes them on; the last scores them. Runs under the caller's autocast."""
        stage = self.stage_module
        group, pp_rank = self.mesh["pp"].get_group(), self.mesh["pp"].get_local_rank()
        was_training = stage.training
        stage.eval()
        loss_sum, count = 0.0, 0
        for batch in batches:
            mask = batch.compact_mask()
            batch = batch.to(self.device)
            if self.is_first:
                x = batch.input_ids
            else:
                x = torch.empty(*batch.input_ids.shape, stage.config.hidden_size, device=self.device)
                dist.recv(x, group=group, group_src=pp_rank - 1)
            out = stage(x, batch.position_ids, mask, check_inputs=False)
            if self.is_last:
                loss_sum += masked_lm_loss_sum(out, batch.targets, batch.loss_mask).item()
                count += batch.num_target_tokens
            else:
                dist.send(out.float().contiguous(), group=group, group_dst=pp_rank + 1)
        stage.train(was_training)
        return self.from_last_stage(loss_sum / max(1, count) if self.is_last else None)

    def from_last_stage(self, value: torch.Tensor | float | None) -> float:
        """A number known on the last pipeline stage (e.g. the loss), broadcast to every rank."""
        source = int(self.mesh.mesh[-1, 0, 0])  # the last stage of dp 0, tp 0 ([pp, dp, tp] ranks)
        cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        buffer = torch.tensor([float(value) if value is not None else 0.0], dtype=torch.float64, device=device)
        dist.broadcast(buffer, src=source)
        return buffer.item()
