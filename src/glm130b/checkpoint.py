"""The model directory: `config.json` (GLMConfig) + `model.safetensors` (official key names).

This is the project's exchange format between training, quantization, generation and evaluation.
Files are written atomically (a temporary name, then a rename), so a crash mid-save leaves the
previous file intact. Loading builds the model on the meta device and assigns the stored tensors,
so no random initialisation is ever materialised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glm130b.config import GLMConfig
from glm130b.errors import GLMError
from glm130b.model import GLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(GLMError):
    """A model directory that is missing, incomplete or does not match its config."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model(model: GLM, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": "glm130b", **(metadata or {})})
    os.replace(tmp, directory / WEIGHTS_FILE)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(model.config.to_dict(), indent=2) + "\n").encode())
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
