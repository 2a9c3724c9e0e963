"""glm130b: the GLM-130B system in PyTorch."""

from glm130b.config import ConfigError, GLMConfig
from glm130b.model import GLM, InputError, KVCache

__all__ = ["GLM", "GLMConfig", "ConfigError", "InputError", "KVCache"]
__version__ = "0.1.0"
