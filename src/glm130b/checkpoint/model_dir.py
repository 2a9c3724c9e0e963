"""The model directory: `config.json` (GLMConfig) + `model.safetensors` (official key names).

This is the project's exchange format between training, quantization, generation and evaluation.
Files are written atomically (a temporary name, then a rename), so a crash mid-save leaves the
previous file intact. Loading builds the model on the meta device and assigns the stored tensors,
so no random initialisation is ever materialised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm130b.core.atomic import atomic_path
from glm130b.core.errors import CheckpointError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import SCALE_SUFFIX, replace_linears

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_config(config: GLMConfig, directory: str | Path) -> None:
    config.save(Path(directory) / CONFIG_FILE)


def save_model(model: GLM, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `model` to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "glm130b", **(metadata or {})})
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


def load_quantized_model(directory: Path, config: GLMConfig, scheme: QuantScheme,
                         device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GLM:
    """A quantized model directory (its metadata records `scheme`), built on meta and assigned."""
    weights = directory / WEIGHTS_FILE
    with torch.device("meta"):
        model = replace_linears(GLM(config), scheme)
    state = load_file(str(weights), device=str(device))
    if dtype is not None:  # packed values stay int8 and scales stay fp16 whatever the compute dtype
        state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(SCALE_SUFFIX) else v
                 for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not match {directory / CONFIG_FILE} quantized as {scheme.name}: "
                              f"{err}") from None
    return model.eval()
