"""Every checkpoint format read the same way: a `TensorSource` lists its tensors under the official
TP = 1 key names and hands each one over in row blocks, read lazily from disk.

Formats: our model directory (one safetensors file, or shards with `model.safetensors.index.json`),
a Hugging Face folder (ours, or ChatGLM-6B's with `pytorch_model-XXXXX-of-XXXXX.bin`), and official
tensor-parallel shards of any degree (glm130b.checkpoint.official). `open_source` tells them apart.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from glm130b.checkpoint.model_dir import CONFIG_FILE, load_config
from glm130b.checkpoint.safetensors import SafetensorsReader, read_weight_map, safetensors_files
from glm130b.core.errors import CheckpointError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import replace_linears

TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
# Buffers some formats store that the model recomputes (rotary inverse frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Source bytes handed over per block: large sequential reads, a small fixed amount of host memory.
BLOCK_BYTES = 2**20


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class TensorSource(Protocol):
    config: GLMConfig
    metadata: dict[str, str]  # string metadata of the weights (e.g. the quantization record)

    def specs(self) -> list[TensorSpec]: ...

    def row_blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]: ...


def read_tensor(source: TensorSource, name: str) -> torch.Tensor:
    """One whole tensor of `source` (read as one block: no second copy)."""
    blocks = list(source.row_blocks(name, max_bytes=2**62))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def rows_per_block(spec: TensorSpec, max_bytes: int) -> int:
    row_bytes = max(1, spec.nbytes // max(1, spec.shape[0] if spec.shape else 1))
    return max(1, max_bytes // row_bytes)


def blocks_of(tensor: torch.Tensor, max_bytes: int) -> Iterator[torch.Tensor]:
    """Row blocks (views) of an in-memory or memory-mapped tensor (a 0-d tensor is one block)."""
    if tensor.dim() == 0:
        yield tensor
        return
    step = rows_per_block(TensorSpec("", tensor.dtype, tuple(tensor.shape)), max_bytes)
    for start in range(0, tensor.shape[0], step):
        yield tensor[start : start + step]


def load_torch_file(path: Path) -> dict:
    """A `.pt`/`.bin` file memory-mapped with weights_only=True: tensors and plain containers only,
    never arbitrary pickled code."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} holds objects other than tensors ({first}); glm130b loads .pt files "
            "with weights_only=True only. Re-save its state dict with torch.save, or convert "
            "it with the tool that wrote it"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(
            f"{path} cannot be read as a torch file ({str(err).splitlines()[0]}); it may be "
            "truncated: download or copy it again"
        ) from None


# ---------------------------------------------------------------------------------- safetensors
@dataclass
class SafetensorsSource:
    """Safetensors weights: one file, or shards listed by an index (`weight_map`: name -> file).
    `prefix` is stripped from stored names (a Hugging Face folder stores `model.transformer...`)."""

    config: GLMConfig
    files: list[Path]
    prefix: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.readers = [SafetensorsReader(f) for f in self.files]
        self.metadata = {**self.readers[0].metadata, **self.metadata}
        self.where: dict[str, tuple[SafetensorsReader, str]] = {}
        for reader in self.readers:
            for stored in reader.tensors:
                if stored.endswith(IGNORED_SUFFIXES):
                    continue
                self.where[stored.removeprefix(self.prefix)] = (reader, stored)

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, r.tensors[s].dtype, r.tensors[s].shape) for name, (r, s) in self.where.items()]

    def row_blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
        reader, stored = self.where[name]
        info = reader.tensors[stored]
        step = rows_per_block(TensorSpec(name, info.dtype, info.shape), max_bytes)
        for start in range(0, info.rows, step):
            yield reader.read_rows(stored, start, min(start + step, info.rows))


# ---------------------------------------------------------------------------------- torch files
@dataclass
class TorchFilesSource:
    """State dicts in `.bin`/`.pt` files (Hugging Face's pytorch_model*.bin), memory-mapped."""

    config: GLMConfig
    files: list[Path]
    prefix: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        for path in self.files:
            for stored, tensor in load_torch_file(path).items():
                if not stored.endswith(IGNORED_SUFFIXES):
                    self.tensors[stored.removeprefix(self.prefix)] = tensor

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in self.tensors.items()]

    def row_blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
        return blocks_of(self.tensors[name], max_bytes)


def torch_files(directory: Path) -> list[Path]:
    index = directory / TORCH_INDEX_FILE
    if index.is_file():
        return [directory / f for f in dict.fromkeys(read_weight_map(index).values())]
    return [directory / TORCH_WEIGHTS_FILE] if (directory / TORCH_WEIGHTS_FILE).is_file() else []


# ---------------------------------------------------------------------------------- detection
def open_model_directory(directory: Path) -> SafetensorsSource:
    config = load_config(directory)
    files = safetensors_files(directory)
    if not files:
        raise CheckpointError(f"{directory} holds {CONFIG_FILE} but no weights (model.safetensors or its shard index)")
    return SafetensorsSource(config, files)


def quantization_of(source: TensorSource) -> QuantScheme | None:
    return QuantScheme.from_metadata(source.metadata, "the source checkpoint")


def expected_specs(config: GLMConfig, scheme: QuantScheme | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model of `config` (quantized by `scheme`) holds."""
    with torch.device("meta"):
        model = GLM(config)
        if scheme is not None:
            replace_linears(model, scheme)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_config(source: TensorSource, where: str | Path) -> None:
    """Every tensor the config implies, with its shape, and nothing else; else one line naming the
    first differences and the fix."""
    expected = expected_specs(source.config, quantization_of(source))
    found = {s.name: s.shape for s in source.specs()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {extra[:3]}" if extra else "",
            "shape mismatch " + ", ".join(f"{k} {found[k]} vs config {expected[k]}" for k in wrong[:3])
            if wrong
            else "",
        ]
        raise CheckpointError(
            f"{where} does not match its model config: "
            + "; ".join(p for p in parts if p)
            + ". Give the config the weights were trained with (or the right --preset)"
        )
