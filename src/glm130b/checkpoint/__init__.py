"""Checkpoints: model directories, official tensor-parallel shards, streamed safetensors, streamed
quantization."""

from glm130b.checkpoint.model_dir import load_config, load_model, save_model

__all__ = ["load_config", "load_model", "save_model"]
