"""The error of the data package: a corpus source or prepared corpus that cannot be used as asked."""

from __future__ import annotations

from glm130b.core.errors import GLMError


class DataError(GLMError):
    """A corpus source or prepared corpus that cannot be used as asked."""
