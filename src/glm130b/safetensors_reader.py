"""Read a safetensors file a block of rows at a time through plain file reads.

safetensors' own readers memory-map the file, which leaves every page touched resident in the
process; streaming a 257 GB checkpoint through a small, fixed amount of host memory needs plain
reads. The format: an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor, plus string metadata), then the tensor bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from glm130b.checkpoint import SAFETENSORS_DTYPES, CheckpointError

DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


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
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which glm130b does not read")
            self.tensors[name] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                            data_start + entry["data_offsets"][0])

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
