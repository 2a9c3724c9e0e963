"""Official GLM-130B checkpoints (SPEC.md section 6): tensor-parallel shards, merged tensor by tensor.

Layout: `<dir>/latest` holds the iteration; `<dir>/<iteration>/mp_rank_XX_model_states.pt` each hold
a dict whose `module` entry is that rank's state dict. Shards are opened memory-mapped and merged
one tensor at a time, so converting the 130B release needs about one merged tensor of host RAM
(the fp16 word embedding, 3.7 GB, is the largest) instead of the >260 GB of all 8 shards at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from glm130b.checkpoint.model_dir import WEIGHTS_FILE, save_config
from glm130b.checkpoint.safetensors import write_streaming
from glm130b.core.errors import CheckpointError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM

SHARD_PATTERN = re.compile(r"mp_rank_(\d+)_model_states\.pt")
# Weights split across ranks by output rows (dim 0) or by input columns (dim 1); the rest replicated.
ROW_SPLIT = ("word_embeddings.weight", "attention.query_key_value.weight", "attention.query_key_value.bias",
             "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "lm_head.weight")
COLUMN_SPLIT = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
# SAT's model_config.json fields that map onto GLMConfig as they are.
SAT_CONFIG_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "inner_hidden_size",
                     "max_sequence_length", "layernorm_epsilon")


def shard_paths(directory: str | Path) -> list[Path]:
    """The rank files of the iteration named in `<directory>/latest`, in rank order."""
    directory = Path(directory)
    latest = directory / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{directory} is not an official checkpoint: it has no 'latest' file naming the iteration")
    iteration = latest.read_text().strip()
    folder = directory / iteration
    ranks = sorted((int(m.group(1)), folder / m.group(0)) for p in folder.glob("mp_rank_*_model_states.pt")
                   if (m := SHARD_PATTERN.fullmatch(p.name)))
    if not ranks:
        raise CheckpointError(f"no mp_rank_XX_model_states.pt files in {folder} (iteration {iteration} from 'latest')")
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise CheckpointError(f"{folder} has ranks {[r for r, _ in ranks]}: some tensor-parallel shards are missing")
    return [p for _, p in ranks]


def sat_config(directory: str | Path) -> GLMConfig | None:
    """The GLMConfig from SAT's `model_config.json` beside the shards, if there is one."""
    path = Path(directory) / "model_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return GLMConfig(**{k: data[k] for k in SAT_CONFIG_FIELDS if k in data})


def merge_shards(name: str, shards: list[torch.Tensor], geglu: bool) -> torch.Tensor:
    """One global (TP = 1) tensor from its per-rank pieces."""
    if len(shards) == 1 or not any(name.endswith(s) for s in ROW_SPLIT + COLUMN_SPLIT):
        return shards[0]
    if any(name.endswith(s) for s in COLUMN_SPLIT):
        return torch.cat(shards, dim=1)
    if geglu and "dense_h_to_4h" in name:
        # Each rank holds [its value rows; its gate rows]: all value halves first, then all gate halves.
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


class OfficialCheckpoint:
    """The shards of an official checkpoint, opened memory-mapped (no tensor data read yet)."""

    def __init__(self, directory: str | Path, config: GLMConfig | None = None):
        self.directory = Path(directory)
        paths = shard_paths(directory)
        self.config = config or sat_config(directory)
        if self.config is None:
            raise CheckpointError(f"{directory} has no model_config.json: name the model, e.g. --preset glm-130b")
        # The official files are pickles written by DeepSpeed (they carry its config objects),
        # so they are loaded with weights_only=False: convert only checkpoints from a trusted source.
        self.modules = [torch.load(p, map_location="cpu", mmap=True, weights_only=False)["module"]
                        for p in paths]
        self.names = [k for k in self.modules[0] if not k.endswith("rotary_emb.inv_freq")]

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        geglu = self.config.ffn == "geglu"
        for name in self.names:
            merged = merge_shards(name, [m[name] for m in self.modules], geglu)
            yield name, merged if dtype is None else merged.to(dtype)

    def specs(self, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Name, dtype and merged shape of every tensor, from shapes alone (meta tensors)."""
        geglu = self.config.ffn == "geglu"
        specs = []
        for name in self.names:
            parts = [torch.empty(m[name].shape, dtype=m[name].dtype, device="meta") for m in self.modules]
            merged = merge_shards(name, parts, geglu)
            specs.append((name, dtype or merged.dtype, tuple(merged.shape)))
        return specs


def convert_official(src: str | Path, dst: str | Path, config: GLMConfig | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write the official checkpoint at `src` as a model directory (config.json + model.safetensors)."""
    checkpoint = OfficialCheckpoint(src, config)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    specs = checkpoint.specs(dtype)
    with torch.device("meta"):  # validates the names and shapes against the config before writing
        expected = {k: tuple(v.shape) for k, v in GLM(checkpoint.config).state_dict().items()}
    found = {name: shape for name, _, shape in specs}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise CheckpointError(f"{src} does not match the model config: missing {missing[:3]}, "
                              f"shape mismatch {[(k, found[k], expected[k]) for k in wrong[:3]]}")
    progress = tqdm(checkpoint.tensors(dtype), total=len(specs), desc="merging shards", unit="tensor")
    write_streaming(dst / WEIGHTS_FILE, specs, progress, metadata={"format": "glm130b", "source": "official"})
    save_config(checkpoint.config, dst)
    return dst
