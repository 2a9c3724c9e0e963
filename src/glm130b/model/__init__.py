"""The GLM model: config and presets, the forward pass, KV cache, attention masks and kernels,
initialisation, FLOP counts."""

from glm130b.model.config import PRESETS, GLMConfig
from glm130b.model.glm import GLM
from glm130b.model.kv_cache import KVCache

__all__ = ["GLM", "GLMConfig", "KVCache", "PRESETS"]
