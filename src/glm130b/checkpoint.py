"""The model directory: `config.json` (GLMConfig) + `model.safetensors` (official key names).

This is the project's exchange format between training, quantization, generation and evaluation.
Files are written atomically (a temporary name, then a rename), so a crash mid-save leaves the
previous file intact. Loading builds the model on the meta device and assigns the stored tensors,
so no random initialisation is ever materialised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm130b.config import GLMConfig
from glm130b.errors import GLMError
from glm130b.model import GLM
from glm130b.quant_format import QuantScheme

# Floating-point types by the names the command line and config files use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(GLMError):
    """A model directory that is missing, incomplete or does not match its config."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# safetensors dtype names (the format's spec)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class StreamingSafetensorsWriter:
    """Writes a safetensors file one tensor at a time, so a checkpoint far larger than host memory
    can be converted holding one tensor. The header needs every name, dtype and shape up front;
    tensors must then be written in that order. The file appears under its name only on close()."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, dtype, shape in specs:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns tensor data to 8 bytes
        self.expected = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self.file = open(self.tmp, "wb")
        self.file.write(len(encoded).to_bytes(8, "little") + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected.pop(0) if self.expected else None
        got = (name, tensor.dtype, tuple(tensor.shape))
        if want != got:
            raise CheckpointError(f"streamed tensor {got} does not match the header's next entry {want}")
        self.file.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.file.close()
        if self.expected:
            raise CheckpointError(f"{len(self.expected)} tensors announced in the header were never written, "
                                  f"starting with {self.expected[0][0]}")
        os.replace(self.tmp, self.path)


def write_streaming(path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (produced lazily, in `specs` order) to a safetensors file at `path`."""
    writer = StreamingSafetensorsWriter(path, specs, metadata)
    try:
        for name, tensor in tensors:
            writer.write(name, tensor)
    except BaseException:
        writer.file.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    writer.close()


def save_config(config: GLMConfig, directory: str | Path) -> None:
    atomic_write_bytes(Path(directory) / CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())


def save_model(model: GLM, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "glm130b", **(metadata or {})})
    os.replace(tmp, directory / WEIGHTS_FILE)
    save_config(model.config, directory)
    return directory


def load_config(directory: str | Path) -> GLMConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG_FILE} is missing "
                              "(save one with glm130b.checkpoint.save_model)")
    return GLMConfig.load(path)


def load_model(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GLM:
    """Build the model of `directory` on the meta device and assign its weights (on `device`)."""
    directory = Path(directory)
    config = load_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the directory holds a config but no weights")
    with safe_open(str(weights), "pt") as f:
        scheme = QuantScheme.from_metadata(f.metadata(), str(weights))
    if scheme is not None:  # written by `glm130b quantize`
        from glm130b.quantize import load_quantized_model  # quantize.py builds on this module

        return load_quantized_model(directory, config, scheme, device, dtype)
    with torch.device("meta"):
        model = GLM(config)
    state = load_file(str(weights), device=str(device))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not match {directory / CONFIG_FILE}: {err}") from None
    return model.eval()
