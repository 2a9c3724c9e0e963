"""Config files and checked fields, shared by the project's config dataclasses.

`DictConfig` gives a dataclass a dict round trip that refuses unknown and missing fields by name,
`read_mapping` / `write_mapping` are the one YAML/JSON reader and writer, and `check_field` the
one type-and-range check, so every config says the same thing about the same mistake.
`field_descriptions` turns the comments beside a config's fields into command-line help, so the
source's documentation of a field is the one the user reads.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import yaml

from glm130b.core.atomic import atomic_write_text
from glm130b.core.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping; an empty YAML file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{what} file {path} does not exist"
            if not path.exists()
            else f"{what} file {path} is a folder; give the file inside it"
        )
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in YAML_SUFFIXES else json.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} does not parse: {str(err).splitlines()[0]}; fix the syntax") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {what} fields, found {type(data).__name__}")
    return data


def write_mapping(path: str | Path, data: dict[str, Any]) -> None:
    """Write YAML (.yaml/.yml) or JSON (anything else), atomically."""
    path = Path(path)
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in YAML_SUFFIXES else json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)


def check_field(
    name: str, value: Any, kind: type, ok: Callable[[Any], bool] = lambda v: True, expected: str | None = None
) -> None:
    """Type and range check of one field. Ints count where floats are expected; bools never count
    as numbers. `expected` describes the allowed values in the message ("a positive integer")."""
    if kind is int:
        right_type = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        right_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        right_type = isinstance(value, kind)
    if not right_type or not ok(value):
        raise ConfigError(f"{name} must be {expected or kind.__name__}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    check_field(name, value, int, lambda v: v > 0, "a positive integer")


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
            raise ConfigError(
                f"unknown {cls.config_label} field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        missing = [
            f.name
            for f in fields
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{cls.config_label} is missing required field(s) {', '.join(missing)}")
        for f in fields:  # a string such as "maybe" or "nope" would read as true
            if f.type in ("bool", bool) and f.name in data and not isinstance(data[f.name], bool):
                raise ConfigError(f"{f.name} must be true or false, got {data[f.name]!r}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write YAML (.yaml/.yml) or JSON (anything else), atomically."""
        write_mapping(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_mapping(path, cls.config_label))


# A comment line made only of dashes (after an optional title) divides a config into sections: it
# describes the section, not the field under it.
SECTION_RULE = "-" * 8


def field_descriptions(cls: type) -> dict[str, str]:
    """Each dataclass field's description, read from the class's source: the comment lines right
    above the field (up to a blank line or a section rule) followed by the comment at the end of
    its line. A field without either is absent, and all are when the source is not installed (a
    build of .pyc files only): help then names the fields without describing them."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line is a comment)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            whole_line = not token.line[: token.start[1]].strip()
            comments[token.start[0]] = (token.string.lstrip("#").strip(), whole_line)
    class_node = ast.parse(source).body[0]
    descriptions = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and comments[line][1] and SECTION_RULE not in comments[line][0]:
            above.insert(0, comments[line][0])
            line -= 1
        trailing = comments.get(node.end_lineno)
        parts = above + ([trailing[0]] if trailing and not trailing[1] else [])
        if parts:
            descriptions[node.target.id] = " ".join(parts)
    return descriptions
