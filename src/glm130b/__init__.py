"""glm130b: the GLM-130B system in PyTorch."""

from glm130b.config import GLMConfig
from glm130b.errors import ConfigError, GLMError, InputError
from glm130b.model import GLM, KVCache

__all__ = ["GLM", "GLMConfig", "ConfigError", "GLMError", "InputError", "KVCache"]
__version__ = "0.1.0"
