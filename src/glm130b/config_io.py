"""Dict round trip shared by the project's config dataclasses: unknown and missing fields are
refused with the field names, so a typo in a YAML file never passes silently."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from glm130b.errors import ConfigError


class DictConfig:
    """Mixin for a dataclass: `to_dict()` and a checked `from_dict()`. `config_label` names the
    config in messages ("unknown GLMConfig field(s) ...")."""

    config_label: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.config_label} field(s) {', '.join(unknown)}; "
                              f"known fields: {', '.join(sorted(known))}")
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.config_label} is missing required field(s) {', '.join(missing)}")
        return cls(**data)
