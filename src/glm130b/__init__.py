"""glm130b: the GLM-130B system in PyTorch."""

from glm130b.core.errors import ConfigError, GLMError, InputError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.model.kv_cache import KVCache

__all__ = ["GLM", "GLMConfig", "ConfigError", "GLMError", "InputError", "KVCache"]
__version__ = "0.1.0"
