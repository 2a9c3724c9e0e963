"""Official GLM-130B checkpoints (SPEC.md section 6): tensor-parallel shards of any degree, read
merged tensor by tensor and written split the way the official tools/convert_tp.py writes them.

Layout: `<dir>/latest` holds the iteration; `<dir>/<iteration>/mp_rank_XX_model_states.pt` each
hold a dict whose `module` entry is that rank's state dict; SAT's `model_config.json` beside them.
Shards are memory-mapped, so converting the 130B release needs about one merged tensor of host RAM
(the fp16 word embedding, 3.7 GB, is the largest) instead of the >260 GB of all 8 shards at once.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from glm130b.checkpoint.sources import TensorSource, TensorSpec, blocks_of, load_torch_file, read_tensor
from glm130b.core.atomic import atomic_path, atomic_write_text
from glm130b.core.config_io import read_mapping
from glm130b.core.errors import CheckpointError
from glm130b.model.config import SHAPE_FIELDS, GLMConfig
from glm130b.model.glm import ROTARY_BASE

SHARD_PATTERN = re.compile(r"mp_rank_(\d+)_model_states\.pt")
# Weights split across ranks by output rows (dim 0) or by input columns (dim 1); the rest replicated.
ROW_SPLIT = (
    "word_embeddings.weight",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "lm_head.weight",
)
COLUMN_SPLIT = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
# SAT's model_config.json fields that map onto GLMConfig as they are.
SAT_CONFIG_FIELDS = (*SHAPE_FIELDS, "layernorm_epsilon", "hidden_dropout", "attention_dropout")
# SAT keeps the rotary inverse frequencies as a buffer under this name in every shard.
SAT_ROTARY_KEY = "mixins.rotary-embedding.rotary_emb.inv_freq"
DEFAULT_ITERATION = "0"  # the `latest` of a checkpoint that did not come from official shards


def shard_paths(directory: str | Path) -> tuple[str, list[Path]]:
    """The iteration named in `<directory>/latest` and its rank files, in rank order."""
    directory = Path(directory)
    latest = directory / "latest"
    if not latest.is_file():
        raise CheckpointError(
            f"{directory} is not an official checkpoint: it has no 'latest' file naming the iteration"
        )
    iteration = latest.read_text().strip()
    folder = directory / iteration
    ranks = sorted(
        (int(m.group(1)), folder / m.group(0))
        for p in folder.glob("mp_rank_*_model_states.pt")
        if (m := SHARD_PATTERN.fullmatch(p.name))
    )
    if not ranks:
        raise CheckpointError(f"no mp_rank_XX_model_states.pt files in {folder} (iteration {iteration} from 'latest')")
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise CheckpointError(f"{folder} has ranks {[r for r, _ in ranks]}: some tensor-parallel shards are missing")
    return iteration, [p for _, p in ranks]


def sat_config(directory: str | Path) -> GLMConfig | None:
    """The GLMConfig from SAT's `model_config.json` beside the shards, if there is one."""
    path = Path(directory) / "model_config.json"
    if not path.is_file():
        return None
    data = read_mapping(path, "SAT model_config")
    return GLMConfig(**{k: data[k] for k in SAT_CONFIG_FIELDS if k in data})


def _split_dim(name: str) -> int | None:
    if name.endswith(COLUMN_SPLIT):
        return 1
    return 0 if name.endswith(ROW_SPLIT) else None


def merge_shards(name: str, shards: list[torch.Tensor], geglu: bool) -> torch.Tensor:
    """One global (TP = 1) tensor from its per-rank pieces."""
    dim = _split_dim(name)
    if len(shards) == 1 or dim is None:
        return shards[0]
    if geglu and "dense_h_to_4h" in name:
        # Each rank holds [its value rows; its gate rows]: all value halves first, then all gate halves.
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def split_tensor(name: str, tensor: torch.Tensor, tp: int, geglu: bool) -> list[torch.Tensor]:
    """The per-rank pieces of a global tensor (the inverse of merge_shards); replicated tensors are
    the same tensor on every rank."""
    dim = _split_dim(name)
    if tp == 1 or dim is None:
        return [tensor] * tp
    if tensor.shape[dim] % tp:
        raise CheckpointError(
            f"{name} has {tensor.shape[dim]} {'rows' if dim == 0 else 'columns'}, which {tp} "
            "tensor-parallel ranks cannot split evenly; pick a degree dividing it"
        )
    if geglu and "dense_h_to_4h" in name:
        value, gate = tensor.chunk(2, dim=0)
        return [torch.cat((v, g)) for v, g in zip(value.chunk(tp), gate.chunk(tp), strict=True)]
    return list(tensor.chunk(tp, dim=dim))


class OfficialCheckpoint(TensorSource):
    """The shards of an official checkpoint as a TensorSource, opened memory-mapped."""

    def __init__(self, directory: str | Path, config: GLMConfig | None = None):
        self.directory = Path(directory)
        self.iteration, paths = shard_paths(directory)
        self.config = config or sat_config(directory)
        if self.config is None:
            raise CheckpointError(f"{directory} has no model_config.json: name the model, e.g. --preset glm-130b")
        self.modules = []
        for path in paths:
            state = load_torch_file(path)
            if not isinstance(state, dict) or "module" not in state:
                raise CheckpointError(f"{path} has no 'module' state dict; it is not a shard of an official checkpoint")
            self.modules.append(state["module"])
        self.metadata = {"source": "official", "iteration": self.iteration}
        self.names = [k for k in self.modules[0] if not k.endswith("inv_freq")]
        for path, module in zip(paths[1:], self.modules[1:], strict=True):
            if [k for k in module if not k.endswith("inv_freq")] != self.names:
                raise CheckpointError(
                    f"{path} holds other tensors than {paths[0].name}: the shards come from "
                    "different checkpoints; copy all of one checkpoint's shards"
                )

    @property
    def tp(self) -> int:
        return len(self.modules)

    def specs(self) -> list[TensorSpec]:
        """Name, dtype and merged shape of every tensor, from shapes alone (meta tensors)."""
        geglu = self.config.ffn == "geglu"
        specs = []
        for name in self.names:
            parts = [torch.empty(m[name].shape, dtype=m[name].dtype, device="meta") for m in self.modules]
            merged = merge_shards(name, parts, geglu)
            specs.append(TensorSpec(name, merged.dtype, tuple(merged.shape)))
        return specs

    def row_blocks(self, name: str, max_bytes: int = 2**20) -> Iterator[torch.Tensor]:
        merged = merge_shards(name, [m[name] for m in self.modules], self.config.ffn == "geglu")
        return blocks_of(merged, max_bytes)


def sat_model_config(config: GLMConfig, tp: int) -> dict:
    """SAT's model_config.json for `config` at tensor-parallel degree `tp`."""
    return {
        "model_class": "GLM130B",
        **{k: getattr(config, k) for k in SAT_CONFIG_FIELDS},
        "layernorm_order": "post",
        "model_parallel_size": tp,
    }


def rotary_inv_freq(config: GLMConfig) -> torch.Tensor:
    """SAT's rotary buffer: 1 / base^(2i / d) over the rotated dims, stored in fp16 whatever the
    weights' dtype (the official class builds its rotary tables in half precision, SPEC.md section 4)."""
    dim = config.head_dim // 2 if config.position_encoding == "2d" else config.head_dim
    return (1.0 / ROTARY_BASE ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).half()


def write_official(
    source: TensorSource,
    destination: Path,
    tp: int,
    tensors: Iterator[tuple[str, torch.Tensor]],
    iteration: str = DEFAULT_ITERATION,
) -> None:
    """Write `tensors` (whole, TP = 1, in any order) as `tp` official shards into the empty folder
    `destination`: each piece goes to a memory-mapped file of its rank first, so host memory holds
    one whole tensor at a time; each rank file is then pickled from those maps, {"module": ...}."""
    geglu = source.config.ffn == "geglu"
    staging = [destination / f".rank{r:02d}" for r in range(tp)]
    for folder in staging:
        folder.mkdir(parents=True)
    pieces: list[dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]] = [{} for _ in range(tp)]
    for name, tensor in tensors:
        for rank, piece in enumerate(split_tensor(name, tensor, tp, geglu)):
            path = staging[rank] / f"{len(pieces[rank]):06d}"
            piece.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)
            pieces[rank][name] = (path, piece.dtype, tuple(piece.shape))
    folder = destination / iteration
    folder.mkdir(parents=True)
    for rank in range(tp):
        module = {SAT_ROTARY_KEY: rotary_inv_freq(source.config)}
        for name, (path, dtype, shape) in pieces[rank].items():
            numel = torch.Size(shape).numel()
            module[name] = torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape)
        with atomic_path(folder / f"mp_rank_{rank:02d}_model_states.pt") as tmp:
            torch.save({"module": module}, tmp)
        del module
        shutil.rmtree(staging[rank])
    atomic_write_text(
        destination / "model_config.json", json.dumps(sat_model_config(source.config, tp), indent=4) + "\n"
    )
    atomic_write_text(destination / "latest", iteration)


def official_tensors(source: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `source`, whole (what write_official splits)."""
    for spec in source.specs():
        yield spec.name, read_tensor(source, spec.name)
