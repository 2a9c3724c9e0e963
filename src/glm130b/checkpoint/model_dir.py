"""The model directory: `config.json` (GLMConfig) + `model.safetensors` (official key names).

This is the project's exchange format between training, quantization, generation and evaluation.
Files are written atomically (a temporary name, then a rename), so a crash mid-save leaves the
previous file intact. Loading builds the model on the meta device and assigns the stored tensors,
so no random initialisation is ever materialised.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glm130b.checkpoint.safetensors import WEIGHTS_FILE, SafetensorsReader, safetensors_files
from glm130b.core.atomic import atomic_path
from glm130b.core.errors import CheckpointError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import SCALE_SUFFIX, replace_linears

CONFIG_FILE = "config.json"


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
        raise CheckpointError(
            f"{directory} is not a model directory: {CONFIG_FILE} is missing "
            "(save one with glm130b.checkpoint.save_model)"
        )
    return GLMConfig.load(path)


def _file_metadata(file: Path) -> dict[str, str]:
    """The string metadata of one safetensors file, after checking that the file holds every byte
    its header describes (a truncated copy is named here, not deep inside a later read)."""
    return SafetensorsReader(file).metadata


def weights_metadata(directory: str | Path) -> dict[str, str]:
    """The string metadata stored with a model directory's weights (scheme, tokenizer fingerprint, step)."""
    files = safetensors_files(Path(directory))
    if not files:
        return {}
    return _file_metadata(files[0])


def load_model(directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GLM:
    """Build the model of `directory` on the meta device and assign its weights (on `device`); a
    quantized directory (the scheme is in the weights' metadata) gives the quantized model."""
    directory = Path(directory)
    config = load_config(directory)
    files = safetensors_files(directory)
    if not files:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is missing; the directory holds a config but no weights")
    scheme = QuantScheme.from_metadata(_file_metadata(files[0]), str(files[0]))
    with torch.device("meta"):
        model = GLM(config) if scheme is None else replace_linears(GLM(config), scheme)
    state = {}
    for file in files:
        try:
            state.update(load_file(str(file), device=str(device)))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise CheckpointError(
                f"{file} cannot be read ({str(err).splitlines()[0]}); it may be truncated: copy or convert it again"
            ) from None
    if dtype is not None:  # packed values stay int8 and quantization scales fp16 whatever the compute dtype
        state = {
            k: v.to(dtype) if v.is_floating_point() and not k.endswith(SCALE_SUFFIX) else v for k, v in state.items()
        }
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        quantized = f" quantized as {scheme.name}" if scheme is not None else ""
        raise CheckpointError(
            f"the weights in {directory} do not match {CONFIG_FILE}{quantized}: {str(err).splitlines()[0]}"
        ) from None
    return model.eval()
