"""Tensor-parallel inference: each rank builds the GLM with only its slice of the four linear layers
of every block (whole heads, [value; gate] rows of the GeGLU input, input columns of the two output
projections, as the official shards hold them) and sums the output projections over the group.

Official shards of the same degree are read one file per rank; any other checkpoint is split on the
fly, tensor by tensor. The word embedding, LayerNorms and an untied head are held whole on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm130b.checkpoint.formats import open_source
from glm130b.checkpoint.official import OfficialCheckpoint, split_tensor
from glm130b.checkpoint.sources import check_against_config, quantization_of, read_tensor
from glm130b.core.errors import CheckpointError, ConfigError
from glm130b.model.glm import GLM

# Linears split by output rows (their outputs stay local) and by input columns (summed over ranks).
COLUMN_PARALLEL = ("attention.query_key_value", "mlp.dense_h_to_4h")
ROW_PARALLEL = ("attention.dense", "mlp.dense_4h_to_h")


class RowParallelLinear(nn.Module):
    """The second half of a tensor-parallel pair: the local product over this rank's input columns,
    summed over the group, then the bias (added once, after the sum)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def _local_tensor(source, name: str, rank: int, tp: int, geglu: bool) -> torch.Tensor:
    """This rank's piece of tensor `name`: its own shard file when the source has the degree `tp`."""
    layer_linear = any(f".{role}." in name for role in COLUMN_PARALLEL + ROW_PARALLEL)
    if not layer_linear:
        return read_tensor(source, name)  # embedding, LayerNorms, head: whole on every rank
    if isinstance(source, OfficialCheckpoint) and source.tp == tp:
        return source.modules[rank][name]
    return split_tensor(name, read_tensor(source, name), tp, geglu)[rank].clone()


def load_sharded_model(
    path: str | Path,
    tp: int,
    rank: int,
    group=None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    preset: str | None = None,
) -> GLM:
    """Rank `rank` of `tp`'s model from the checkpoint at `path` (any format glm130b reads)."""
    source = open_source(path, preset)
    check_against_config(source, path)
    config = source.config
    if quantization_of(source) is not None:
        raise CheckpointError(
            f"{path} is quantized; tensor-parallel loading reads floating-point checkpoints "
            "(convert the original weights, then quantize each rank's slice on load)"
        )
    if config.num_attention_heads % tp or config.inner_hidden_size % tp:
        raise ConfigError(
            f"--tp {tp} must divide the {config.num_attention_heads} heads and the FFN width "
            f"{config.inner_hidden_size}; pick a degree dividing both"
        )
    with torch.device("meta"):
        model = GLM(config)
    geglu = config.ffn == "geglu"
    for spec in source.specs():
        tensor = _local_tensor(source, spec.name, rank, tp, geglu).to(device)
        tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        owner_name, leaf = spec.name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
    for block in model.transformer.layers:
        for role in ROW_PARALLEL:
            parent_name, child = role.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, child)
            setattr(parent, child, RowParallelLinear(linear.weight.data, linear.bias.data, group))
    model.tensor_parallel_degree = tp
    return model.eval()
