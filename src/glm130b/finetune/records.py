"""Supervised fine-tuning data: JSON lines of prompt and target text, read and checked line by line.

Three line formats (SPEC.md section 9 for the official two):
- `{"prompt": ..., "target": ...}`;
- generation: `{"inputs_pretokenized": ..., "targets_pretokenized": [...]}`, the first reference is the target;
- multiple choice: `{"inputs_pretokenized": ..., "choices_pretokenized": [...], "label": i}`, the
  labelled choice is the target.
A bad line stops the reading with one message naming the file and line. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from glm130b.core.errors import GLMError

FORMATS = (
    "{'prompt', 'target'}",
    "{'inputs_pretokenized', 'targets_pretokenized'}",
    "{'inputs_pretokenized', 'choices_pretokenized', 'label'}",
)


class RecordError(GLMError):
    """A fine-tuning data file, or one line of it, that cannot be used."""


@dataclass(frozen=True)
class Record:
    prompt: str
    target: str
    where: str  # "file:line", for messages about the record


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise RecordError(
            f"fine-tuning data {path} does not exist"
            if not path.exists()
            else f"fine-tuning data {path} is a folder; give the .jsonl file inside it"
        )
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            where = f"{path}:{number}"
            if line.strip():
                records.append(_record(line, where))
    if not records:
        raise RecordError(f"{path} holds no records; write one JSON object per line ({FORMATS[0]})")
    return records


def _record(line: str, where: str) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: not valid JSON ({err.msg}); write one object per line") from None
    if not isinstance(data, dict):
        raise RecordError(f"{where}: a line must be a JSON object, got {type(data).__name__}")
    if "prompt" in data or "target" in data:
        prompt, target = _text(data, "prompt", where), _text(data, "target", where)
    elif "inputs_pretokenized" in data:
        prompt = _text(data, "inputs_pretokenized", where)
        target = _official_target(data, where)
    else:
        raise RecordError(f"{where}: no prompt and target; a line is one of {', '.join(FORMATS)}")
    if not target.strip():
        raise RecordError(f"{where}: the target is empty, so there is nothing to learn; drop the line or fill it in")
    return Record(prompt, target, where)


def _official_target(data: dict, where: str) -> str:
    if "targets_pretokenized" in data:
        targets = data["targets_pretokenized"]
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise RecordError(f"{where}: targets_pretokenized must be a non-empty list of strings")
        return targets[0]
    if "choices_pretokenized" in data:
        choices, label = data["choices_pretokenized"], data.get("label")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise RecordError(f"{where}: choices_pretokenized must be a non-empty list of strings")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise RecordError(
                f"{where}: label must be the index of the right choice, 0..{len(choices) - 1}, got {label!r}"
            )
        return choices[label]
    raise RecordError(f"{where}: inputs_pretokenized without targets_pretokenized or choices_pretokenized + label")


def _text(data: dict, field: str, where: str) -> str:
    if field not in data:
        raise RecordError(f"{where}: the field {field!r} is missing")
    if not isinstance(data[field], str):
        raise RecordError(f"{where}: {field} must be a string, got {type(data[field]).__name__}")
    return data[field]
