"""The project's error types. Every error a user can cause derives from GLMError and says what was
wrong and what to do; the command line prints its message instead of a stack trace."""


class GLMError(ValueError):
    """Bad input from the user: a message naming the problem and the fix."""


class ConfigError(GLMError):
    """A configuration value that cannot build what was asked."""


class InputError(GLMError):
    """Model inputs (ids, positions, masks, cache) that do not fit the model."""


class CheckpointError(GLMError):
    """A model file or folder that is missing, incomplete, or does not match its config."""
