"""Streamed safetensors: written one tensor at a time, read a block of rows at a time.

safetensors' own readers memory-map the file, which leaves every page touched resident in the
process; streaming a 257 GB checkpoint through a small, fixed amount of host memory needs plain
reads. The format: an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor, plus string metadata), then the tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from glm130b.core.atomic import atomic_path
from glm130b.core.config_io import read_mapping, write_mapping
from glm130b.core.errors import CheckpointError

# safetensors dtype names (the format's spec)
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StreamingSafetensorsWriter:
    """Writes a safetensors file one tensor at a time, so a checkpoint far larger than host memory
    can be converted holding one tensor. The header needs every name, dtype and shape up front;
    tensors must then be written in that order."""

    def __init__(
        self,
        file: BinaryIO,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, dtype, shape in specs:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns tensor data to 8 bytes
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self.file = file
        self.file.write(len(encoded).to_bytes(8, "little") + encoded)

    def write(self, name: str, tensor: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """The next tensor: whole, or as consecutive row blocks (never joined in memory)."""
        want = self.expected.pop(0) if self.expected else None
        blocks = [tensor] if isinstance(tensor, torch.Tensor) else tensor
        rows, got = 0, None
        for block in blocks:
            got = (name, block.dtype, tuple(block.shape))
            if want is None or want[:2] != got[:2] or tuple(block.shape[1:]) != want[2][1:]:
                raise CheckpointError(f"streamed tensor {got} does not match the header's next entry {want}")
            rows += block.shape[0] if block.dim() else 1
            # a view of the tensor's own bytes: no copy on the way to the file
            self.file.write(memoryview(block.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        if want is None or rows != (want[2][0] if want[2] else 1):
            raise CheckpointError(f"streamed tensor {name} has {rows} rows; the header's next entry is {want}")

    def finish(self) -> None:
        if self.expected:
            raise CheckpointError(
                f"{len(self.expected)} tensors announced in the header were never written, "
                f"starting with {self.expected[0][0]}"
            )


def write_streaming(
    path: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor | Iterable[torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` (produced lazily, in `specs` order; each whole or as row blocks) to a
    safetensors file at `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        writer = StreamingSafetensorsWriter(file, specs, metadata)
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.finish()


# the inverse table, format name -> torch dtype
DTYPE_OF_FORMAT_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first dim (the whole tensor for a 0-d one)."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


class SafetensorsReader:
    """The header of a safetensors file (`tensors`, `metadata`) and reads of row ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError) as err:
            raise CheckpointError(f"cannot read the safetensors header of {self.path}: {err}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        end = data_start + max((entry["data_offsets"][1] for entry in header.values()), default=0)
        size = self.path.stat().st_size
        if size < end:
            raise CheckpointError(
                f"{self.path} is truncated: its header describes {end:,} bytes, the file holds {size:,}; "
                "copy or convert it again"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPE_OF_FORMAT_NAME:
                raise CheckpointError(
                    f"{self.path}: tensor {name} has dtype {entry['dtype']}, which glm130b does not read"
                )
            self.tensors[name] = TensorInfo(
                DTYPE_OF_FORMAT_NAME[entry["dtype"]], tuple(entry["shape"]), data_start + entry["data_offsets"][0]
            )

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (start 0, stop 1 reads a 0-d tensor)."""
        info = self.tensors[name]
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        buffer = bytearray(info.row_bytes * (stop - start))
        with open(self.path, "rb") as f:
            f.seek(info.offset + start * info.row_bytes)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path} is truncated inside tensor {name}")
        if not buffer:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(shape)


SHARD_INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def write_sharded(
    directory: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor | Iterable[torch.Tensor]]],
    metadata: dict[str, str],
    max_shard_bytes: int,
) -> list[Path]:
    """`tensors` (in `specs` order) as model.safetensors, or, past `max_shard_bytes`, as
    model-0000i-of-0000n.safetensors shards plus the Hugging Face index (`weight_map`)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = torch.Size(spec[2]).numel() * spec[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = (
        [WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    stream = iter(tensors)
    for name, shard in zip(names, shards, strict=True):
        write_streaming(directory / name, shard, (next(stream) for _ in shard), metadata)
    if len(shards) > 1:
        weight_map = {spec[0]: name for name, shard in zip(names, shards, strict=True) for spec in shard}
        total = sum(torch.Size(s[2]).numel() * s[1].itemsize for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_mapping(directory / SHARD_INDEX_FILE, index)
    return [directory / n for n in names]


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a folder: those its index names, else the single model.safetensors."""
    index = directory / SHARD_INDEX_FILE
    if index.is_file():
        weight_map = read_weight_map(index)
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists {missing[0].name}, which is missing; copy every shard of the model")
        return files
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    return []


def read_weight_map(index: Path) -> dict[str, str]:
    """name -> file of a Hugging Face style weight index."""
    weight_map = read_mapping(index, "weight index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index} is not a weight index (a JSON object with a 'weight_map'); "
            "copy the index the checkpoint came with"
        )
    return weight_map
