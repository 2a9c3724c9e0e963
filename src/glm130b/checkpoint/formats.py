"""Which checkpoint format a folder holds, opened as a TensorSource: official shards (a `latest`
file), a Hugging Face folder (config.json with a model_type) or our model directory."""

from __future__ import annotations

from pathlib import Path

from glm130b.checkpoint.huggingface import open_huggingface
from glm130b.checkpoint.model_dir import CONFIG_FILE
from glm130b.checkpoint.official import OfficialCheckpoint
from glm130b.checkpoint.sources import TensorSource, open_model_directory
from glm130b.core.config_io import read_mapping
from glm130b.core.errors import CheckpointError
from glm130b.model.config import GLMConfig


def open_source(path: str | Path, preset: str | None = None) -> TensorSource:
    """The checkpoint at `path`, whichever format: official shards (a `latest` file), a Hugging Face
    folder (config.json with a model_type) or our model directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a folder; give a model directory, a Hugging Face folder or an "
            "official checkpoint folder (the one holding 'latest')"
        )
    if (path / "latest").is_file():
        return OfficialCheckpoint(path, GLMConfig.from_preset(preset) if preset else None)
    if (path / CONFIG_FILE).is_file():
        data = read_mapping(path / CONFIG_FILE, "model config")
        return open_huggingface(path, data) if "model_type" in data else open_model_directory(path)
    raise CheckpointError(
        f"{path} holds no checkpoint: no config.json (model directory or Hugging Face folder) "
        "and no 'latest' (official shards)"
    )
