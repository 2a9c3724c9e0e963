"""Scaling past one device: a DeviceMesh from a validated dataclass of degrees, and `parallelize`.

The model code (glm130b.model) knows nothing of parallelism. `parallelize(model, mesh, pcfg)`
applies, in this order: tensor parallel (a DTensor plan), torch.compile, activation checkpointing,
FSDP2 (torchtitan's, with compile inside the recomputed region: see apply_compile). Checkpoints go
through torch.distributed.checkpoint (DCP), so the parallel layout is a load-time property. Why the TP plan splits the GeGLU input into two parameters and
leaves the embedding replicated: docs/distributed.md, parallelize.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh

from glm130b.core.config_io import DictConfig, check_field, check_positive_int
from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import CheckpointError, ConfigError, GLMError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import FeedForward, GLMBlock

MESH_DIMS = ("pp", "dp", "tp")  # outermost first: tp innermost keeps its traffic inside a node
PP_SCHEDULES = ("1F1B", "GPipe")
# torch.distributed.tensor, .fsdp, .checkpoint and .pipelining are imported where they are used:
# together they take about a second to import, which every `glm130b` command would pay otherwise.


# ---------------------------------------------------------------------------------- degrees
@dataclass
class ParallelConfig(DictConfig):
    """Degrees of parallelism and the switches `parallelize` applies. dp * tp * pp = world size."""

    config_label = "parallel"

    tp: int = 1  # tensor-parallel degree (Megatron splits of every linear layer)
    pp: int = 1  # pipeline-parallel degree (stages of consecutive blocks)
    # FSDP2 degree; -1 = whatever world_size / (tp * pp) leaves.
    dp: int = -1
    # FSDP2 frees the gathered weights after each block's forward (ZeRO-3); False keeps them until
    # the backward (ZeRO-2: more memory, one all-gather per step instead of two).
    reshard_after_forward: bool = True
    # Recompute every transformer block in the backward (the GLM-130B recipe recomputed every layer).
    # The one switch for it: a plain one-process `glm130b pretrain` applies it too (and compile).
    activation_checkpointing: bool = False
    # torch.compile each transformer block (per block keeps compile time flat in depth).
    compile: bool = False
    # FSDP2 mixed precision: weights gathered and computed in param_dtype, gradients reduced in
    # reduce_dtype, the sharded fp32 master weights and AdamW states stay fp32.
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"  # the dtype gradients are reduced in
    pp_schedule: str = "1F1B"  # the pipeline schedule (torch.distributed.pipelining): 1F1B or GPipe
    # Pipeline microbatches per step. None = one per micro-batch of a data-parallel rank's share of
    # the global batch: global_batch_size / (dp x micro_batch_size), Megatron's rule (the most
    # microbatches, so the smallest 1F1B bubble, (pp - 1) / (m + pp - 1)). `glm130b pretrain` and
    # `glm130b plan` both fill it in with with_microbatches().
    pp_microbatches: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            check_positive_int(f"parallel.{name}", getattr(self, name))
        check_field(
            "parallel.dp",
            self.dp,
            int,
            lambda v: v >= 1 or v == -1,
            "a positive integer or -1 (infer from the world size)",
        )
        for name in ("reshard_after_forward", "activation_checkpointing", "compile"):
            check_field(f"parallel.{name}", getattr(self, name), bool, expected="true or false")
        for name in ("param_dtype", "reduce_dtype"):
            check_field(
                f"parallel.{name}", getattr(self, name), str, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"
            )
        check_field(
            "parallel.pp_schedule",
            self.pp_schedule,
            str,
            lambda v: v in PP_SCHEDULES,
            f"one of {', '.join(PP_SCHEDULES)}",
        )
        if self.pp_microbatches is not None:
            check_field(
                "parallel.pp_microbatches",
                self.pp_microbatches,
                int,
                lambda v: v > 0,
                "a positive integer or null (one per micro-batch)",
            )

    @property
    def microbatches(self) -> int:
        if self.pp_microbatches is None:
            raise ConfigError(
                "parallel.pp_microbatches is not filled in yet: call "
                "ParallelConfig.with_microbatches(global_batch_size, micro_batch_size) first"
            )
        return self.pp_microbatches

    def with_microbatches(self, global_batch_size: int, micro_batch_size: int) -> ParallelConfig:
        """A copy with pp_microbatches filled in by the rule next to the field (dp resolved first)."""
        if self.pp_microbatches is not None:
            return self
        if self.dp < 1:
            raise ConfigError("parallel.dp is still -1: call resolve(world_size) before with_microbatches")
        per_step = self.dp * micro_batch_size
        if global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {global_batch_size} is not a multiple of dp {self.dp} x "
                f"micro_batch_size {micro_batch_size} = {per_step}: every data-parallel rank takes "
                f"whole micro-batches of each global batch; pick a multiple of {per_step}"
            )
        return dataclasses.replace(self, pp_microbatches=global_batch_size // per_step)

    def resolve(self, world_size: int) -> ParallelConfig:
        """A copy with dp filled in for `world_size`; raises ConfigError if the degrees do not fit."""
        if world_size < 1:
            raise ConfigError(f"world size must be positive, got {world_size}")
        if world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tp {self.tp} x pp {self.pp} = "
                f"{self.tp * self.pp}; launch a multiple of {self.tp * self.pp} processes or change the degrees"
            )
        dp = world_size // (self.tp * self.pp) if self.dp == -1 else self.dp
        if dp * self.tp * self.pp != world_size:
            raise ConfigError(
                f"dp {dp} x tp {self.tp} x pp {self.pp} = {dp * self.tp * self.pp} processes, but the "
                f"world size is {world_size}; set parallel.dp to {world_size // (self.tp * self.pp)} or -1"
            )
        return dataclasses.replace(self, dp=dp)

    def validate(self, model: GLMConfig, world_size: int) -> ParallelConfig:
        """Resolve dp and check every degree against the model shape; returns the resolved copy."""
        resolved = self.resolve(world_size)
        tp = self.tp
        for what, size in (
            ("num_attention_heads", model.num_attention_heads),
            ("inner_hidden_size", model.inner_hidden_size),
        ):
            if size % tp:
                raise ConfigError(
                    f"tp {tp} must divide {what} ({size}): a tensor-parallel shard holds whole "
                    f"{'heads' if what == 'num_attention_heads' else 'FFN columns'}; pick tp from "
                    f"the divisors of {size}"
                )
        if model.ffn != "geglu" and model.inner_hidden_size % tp:
            raise ConfigError(f"tp {tp} must divide inner_hidden_size {model.inner_hidden_size}")
        if self.pp > model.num_layers:
            raise ConfigError(
                f"pp {self.pp} exceeds num_layers {model.num_layers}: every pipeline stage needs "
                "at least one transformer layer"
            )
        if self.pp > 1 and self.pp_microbatches is not None and self.pp_microbatches < self.pp:
            raise ConfigError(
                f"pp_microbatches {self.pp_microbatches} is smaller than pp {self.pp}: the pipeline "
                "would never fill; use at least pp microbatches (set parallel.pp_microbatches, or "
                "a smaller micro_batch_size or a larger global batch for the default of one per "
                "micro-batch)"
            )
        return resolved


def build_mesh(pcfg: ParallelConfig, device_type: str | None = None):
    """One DeviceMesh [pp, dp, tp] over the initialized process group (sizes of 1 are kept, so
    `mesh["dp"]` etc. always exist)."""
    if not dist.is_initialized():
        raise GLMError(
            "torch.distributed is not initialized: launch with torchrun (or call "
            "dist.init_process_group) before building a device mesh"
        )
    pcfg = pcfg.resolve(dist.get_world_size())
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (pcfg.pp, pcfg.dp, pcfg.tp), mesh_dim_names=MESH_DIMS)


# ---------------------------------------------------------------------------------- GeGLU halves
class GeGLUInput(nn.Module):
    """dense_h_to_4h of a GeGLU FFN as two projections: same output, [value(x), gate(x)].

    Keeping the halves as separate parameters lets tensor parallel shard each contiguously (each
    rank gets [its value rows; its gate rows]) while every checkpoint stores each half in its
    official order, whatever the layout (docs/distributed.md, parallelize).
    """

    def __init__(self, value: nn.Linear, gate: nn.Linear):
        super().__init__()
        self.value, self.gate = value, gate

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GeGLUInput:
        half = linear.out_features // 2
        halves = []
        for rows in (slice(0, half), slice(half, 2 * half)):
            part = nn.Linear(
                linear.in_features,
                half,
                bias=linear.bias is not None,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            part.weight = nn.Parameter(linear.weight.detach()[rows].clone(), linear.weight.requires_grad)
            if linear.bias is not None:
                part.bias = nn.Parameter(linear.bias.detach()[rows].clone(), linear.bias.requires_grad)
            halves.append(part)
        return cls(*halves)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.value(x), self.gate(x)), dim=-1)  # [..., 2F/tp]: local [value; gate]


def split_geglu(model: nn.Module) -> nn.Module:
    """Replace every GeGLU dense_h_to_4h by GeGLUInput (idempotent; ChatGLM's plain FFN untouched)."""
    for module in model.modules():
        if isinstance(module, FeedForward) and module.kind == "geglu" and isinstance(module.dense_h_to_4h, nn.Linear):
            module.dense_h_to_4h = GeGLUInput.from_linear(module.dense_h_to_4h)
    return model


def _split_key(key: str) -> bool:
    return key.endswith(("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"))


def to_split_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> the keys of a split-GeGLU model (value rows first, gate rows second)."""
    out = {}
    for key, value in state_dict.items():
        if _split_key(key):
            stem, leaf = key.rsplit(".", 1)
            v, g = value.chunk(2, dim=0)
            out[f"{stem}.value.{leaf}"], out[f"{stem}.gate.{leaf}"] = v, g
        else:
            out[key] = value
    return out


def to_official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_split_keys: merge value/gate halves into official dense_h_to_4h tensors."""
    out = {}
    for key, value in state_dict.items():
        if ".mlp.dense_h_to_4h.gate." in key:
            continue
        if ".mlp.dense_h_to_4h.value." in key:
            stem, leaf = key.split(".value.")
            out[f"{stem}.{leaf}"] = torch.cat((value, state_dict[f"{stem}.gate.{leaf}"]), dim=0)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------- parallelize
def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """DTensor plan: qkv and both GeGLU halves column-parallel, the two output projections
    row-parallel. ColwiseParallel hands the modules plain local tensors, and the attention reads
    its local head count from them, so the model's config stays as it is."""
    from torch.distributed.tensor.parallel import (  # deferred: see top
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for block in model.modules():
        if not isinstance(block, GLMBlock):
            continue
        plan = {
            "attention.query_key_value": ColwiseParallel(),
            "attention.dense": RowwiseParallel(),
            "mlp.dense_4h_to_h": RowwiseParallel(),
        }
        if isinstance(block.mlp.dense_h_to_4h, GeGLUInput):
            plan.update({"mlp.dense_h_to_4h.value": ColwiseParallel(), "mlp.dense_h_to_4h.gate": ColwiseParallel()})
        else:
            plan["mlp.dense_h_to_4h"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer block in the backward (non-reentrant, so it composes with FSDP2
    and compile). State-dict helpers of torch.distributed.checkpoint strip the wrapper's name."""
    for layers in _layer_lists(model):
        for name, block in list(layers.named_children()):
            setattr(layers, name, checkpoint_wrapper(block, preserve_rng_state=True))


def apply_compile(model: nn.Module) -> None:
    """torch.compile every transformer block, before activation checkpointing wraps it: the
    prefix-LM attention is a graph break (glm130b.model.prefix_attention.attend_prefix_lm), which
    dynamo cannot hold inside a checkpointed region; it would run the whole block eagerly."""
    for layers in _layer_lists(model):
        for block in layers.children():
            block.compile()  # in place: parameter names do not change


def apply_fsdp(model: nn.Module, dp_mesh, pcfg: ParallelConfig) -> None:
    """FSDP2 per transformer block, then the root (embedding, final LayerNorm)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # deferred: see top

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[pcfg.param_dtype], reduce_dtype=DTYPES[pcfg.reduce_dtype])
    for layers in _layer_lists(model):
        blocks = list(layers.children())
        for i, block in enumerate(blocks):
            # The last block's weights are needed again first in the backward: keep them gathered.
            last = i == len(blocks) - 1
            fully_shard(
                block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward and not last
            )
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward)


def parallelize(model: nn.Module, mesh, pcfg: ParallelConfig) -> nn.Module:
    """Apply TP, compile, activation checkpointing and FSDP2 (in that order) in place; returns model.

    FSDP2 applies when dp > 1 or tp > 1 (see the comment at that step).
    `mesh` is build_mesh's [pp, dp, tp] mesh, or None for one process (then only the GeGLU split,
    checkpointing and compile apply, so the module names match every other layout's). `model` is a
    GLM or a pipeline stage of one; all ranks must start from the same weights (same seed), or load
    them afterwards with load_checkpoint.
    """
    split_geglu(model)
    if mesh is not None:
        pcfg = pcfg.resolve(mesh.size())
        if pcfg.tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
    if pcfg.compile:
        apply_compile(model)
    if pcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None and (pcfg.dp > 1 or pcfg.tp > 1):
        # With dp = 1 (TP only) FSDP2 shards nothing, but it turns the replicated parameters into
        # DTensors too: fused/foreach AdamW refuse a mix of plain tensors and DTensors.
        apply_fsdp(model, mesh["dp"], pcfg)
    return model


def _layer_lists(model: nn.Module) -> list[nn.Module]:
    """The containers of transformer blocks (a GLM's ModuleList; a pipeline stage's holds None for
    the layers of other stages, which children() skips)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and any(
            isinstance(c, GLMBlock) or isinstance(getattr(c, "_checkpoint_wrapped_module", None), GLMBlock)
            for c in m.children()
        )
    ]


# ---------------------------------------------------------------------------------- training helpers
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip the global gradient norm across any mix of plain, TP-sharded and FSDP-sharded grads.

    torch.nn.utils.clip_grad_norm_ stacks per-parameter norms, which fails when plain tensors and
    DTensors on different meshes are mixed (TP without FSDP leaves the replicated parameters plain).
    Each DTensor norm is reduced over its own mesh (DTensor handles shards vs replicas), so no
    element is counted twice. With pipeline stages, pass the pp group (and leave the last stage's
    copy of the tied embedding out of `parameters`): the squares are summed over the stages. The
    total is finally made bit-identical on every rank (a MAX all-reduce), so that replicated
    parameters stay identical. Collective when distributed. Returns the total norm before clipping.
    """
    from torch.distributed.tensor import DTensor  # deferred: see top

    grads = [p.grad for p in parameters if p.grad is not None]
    device = None
    squares = []
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        device = device or norm.device
        squares.append(norm.to(device) ** 2)
    if device is None:
        device = torch.device(
            "cuda" if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        )
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.item() if isinstance(g, DTensor) else coef.to(g.device))
    return total


# ---------------------------------------------------------------------------------- checkpoints
def _state_dict_options(flatten_optimizer: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # deferred: see top

    return StateDictOptions(flatten_optimizer_state_dict=flatten_optimizer)


def _flattened_optimizer(saved_keys) -> bool:
    """Whether a checkpoint keys its optimizer param groups by parameter name
    (`optim.param_groups.transformer.layers.0...lr`) rather than by position (`optim.param_groups.0.lr`)."""
    return any(k.startswith("optim.param_groups.") and not k.split(".")[2].isdigit() for k in saved_keys)


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    flatten_optimizer: bool = False,
) -> Path:
    """Save model (and optimizer) state with torch.distributed.checkpoint: every rank writes its own
    shards, keyed by parameter name and global shape, so any other layout can load it. Call on
    every rank. `extra` holds small picklable state (step, scheduler, data position).

    An optimizer without state yet (before its first step) is left out: get_state_dict would
    create the state with a zero-gradient step, which counts as AdamW's first step and changes
    the bias correction of every later one. load_checkpoint then gives the optimizer no state.

    flatten_optimizer: key the optimizer's param groups by parameter name. Pipeline stages need it:
    by position, every stage's group 0 has the same key and only one stage's parameter list would be
    kept. load_checkpoint recognises either form."""
    import torch.distributed.checkpoint as dcp  # deferred: see top
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    if optimizer is not None and not optimizer.state:
        optimizer = None
    model_sd, optim_sd = get_state_dict(
        model,
        optimizer if optimizer is not None else [],
        options=_state_dict_options(flatten_optimizer=flatten_optimizer),
    )
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    if extra is not None:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=str(directory))
    return directory


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Load a save_checkpoint directory into `model` (and `optimizer`) in place, whatever layout
    either side used. `extra`: a dict shaped like the saved one (e.g. {"step": 0}); returned filled."""
    import torch.distributed.checkpoint as dcp  # deferred: see top
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CheckpointError(
            f"{directory} is not a torch.distributed.checkpoint directory (no .metadata); "
            "give the directory that save_checkpoint wrote"
        )
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    if optimizer is not None and not any(key.startswith("optim.") for key in saved):
        optimizer.state.clear()  # saved before the optimizer's first step (save_checkpoint)
        optimizer = None
    options = _state_dict_options(flatten_optimizer=_flattened_optimizer(saved))
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=options)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    if extra is not None:
        state["extra"] = dict(extra)
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as err:  # DCP raises a CheckpointException listing the missing keys
        raise CheckpointError(
            f"could not load {directory} into this model: {err}. The checkpoint must come from "
            "a parallelized model of the same GLMConfig (see docs/distributed.md)"
        ) from err
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
        options=options,
    )
    return state.get("extra")


def full_state_dict(model: nn.Module, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """The whole model on CPU under the official key names (TP = 1 layout), e.g. for
    glm130b.checkpoint.save_model: on global rank 0 only (an empty dict elsewhere), or with
    `all_ranks` on every rank (gathered on the device first). Collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # deferred: see top

    options = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
    state = get_model_state_dict(model, options=options)
    return to_official_keys({k: v.detach().cpu() for k, v in state.items()})


def init_distributed(backend: str | None = None) -> int:
    """init_process_group from torchrun's environment (no-op if already up); returns the rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise GLMError("RANK is not set: launch distributed runs with torchrun --nproc_per_node N ...")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank()


__all__ = [
    "ParallelConfig",
    "build_mesh",
    "parallelize",
    "GeGLUInput",
    "split_geglu",
    "to_split_keys",
    "to_official_keys",
    "clip_grad_norm_",
    "save_checkpoint",
    "load_checkpoint",
    "full_state_dict",
    "init_distributed",
]
