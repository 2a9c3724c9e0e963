"""Task data files -> items with token ids (SPEC.md section 9, "Data").

mul and gen files are JSON lines: `inputs_pretokenized` with `choices_pretokenized` and `label`, or
with `targets_pretokenized`; the official id forms `inputs` / `choices` / `targets` are taken as
they are. Every text is encoded on its own, as the official code does. The lines of the official
bias tasks carry the fields in PROTOCOL_FIELDS too. An lm file is raw text, encoded in one piece; a
Pile file JSON lines of documents (`text` ids or `text_pretokenized`, and `meta.pile_set_name`). A
bad line is one error naming the file, the line and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from glm130b.core.digest import sha256_file
from glm130b.core.errors import GLMError


class TaskDataError(GLMError):
    """A task data file that is missing, unreadable or malformed."""


STEREOSET_LABELS = ("stereotype", "anti-stereotype", "unrelated")


def _is_id(value, choices: int) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


# The fields a protocol's lines carry besides the multiple-choice ones (the official CrowS-Pairs and
# StereoSet classes read them): name -> (check(value, number of choices), what it must be). Kept in
# the item's meta.
PROTOCOL_FIELDS = {
    "crows_pair": {
        "pair_ID": (_is_id, "a number or string naming the sentence pair"),
        "sent_ID": (lambda v, choices: type(v) is int and v in (1, 2), "1 or 2 (its place in the pair)"),
        "bias_type": (lambda v, choices: isinstance(v, str), "a string (the bias category)"),
    },
    "stereoset": {
        "ID": (_is_id, "a number or string"),
        "bias_type": (lambda v, choices: isinstance(v, str), "a string (the bias category)"),
        "goal_label": (
            lambda v, choices: isinstance(v, list) and len(v) == choices and all(x in STEREOSET_LABELS for x in v),
            f"a list of one label per choice, each {' / '.join(STEREOSET_LABELS)}",
        ),
    },
}


@dataclass
class Item:
    index: int  # position in its file (0-based)
    context: list[int]  # the encoded input
    text: str  # the input text (decoded from ids when the file held ids)
    choices: list[list[int]] = field(default_factory=list)  # mul
    choice_texts: list[str] = field(default_factory=list)
    label: int | None = None  # mul: index of the right choice
    targets: list[list[int]] = field(default_factory=list)  # gen: references
    meta: dict = field(default_factory=dict)  # `id`, `few_shot_ids` and the like, carried into results


@dataclass
class TaskFile:
    path: Path
    sha256: str
    items: list[Item]  # mul / gen
    text: str = ""  # lm: the raw text
    tokens: list[int] = field(default_factory=list)  # lm: its ids


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TaskDataError(f"data file {path} does not exist; check --data-root and the task's path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TaskDataError(f"{path} is not UTF-8 text; convert it to UTF-8") from None


def _ids_or_text(record: dict, key: str, where: str, many: bool):
    """(ids, None) when the record holds `key` as ids, else (None, text) from `key`_pretokenized."""
    if key in record:
        value = record[key]
        ok = (
            all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value)
            if many
            else all(isinstance(t, int) for t in value)
        )
        if not isinstance(value, list) or not ok:
            raise TaskDataError(
                f"{where}: {key!r} must be token ids ({'a list of lists' if many else 'a list'} "
                f"of integers); or give the text as {key}_pretokenized"
            )
        return value, None
    text_key = f"{key}_pretokenized"
    if text_key not in record:
        raise TaskDataError(f"{where}: neither {text_key!r} nor {key!r} is given; every line needs one of them")
    value = record[text_key]
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value) if many else isinstance(value, str)
    if not ok:
        raise TaskDataError(f"{where}: {text_key!r} must be {'a list of strings' if many else 'a string'}")
    return None, value


def _json_records(path: Path, limit: int | None, expected: str) -> list[tuple[str, dict]]:
    """(where, object) of each non-empty line, the first `limit` of them."""
    lines = _read_text(path).split("\n")  # not splitlines(): JSON strings may hold U+2028 and the like
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(records) == limit:
            break
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{where} is not JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"{where} must be a JSON object with {expected}")
        records.append((where, record))
    if not records:
        raise TaskDataError(f"{path} holds no items; write one JSON object per line")
    return records


def _protocol_fields(record: dict, where: str, protocol: str | None, choices: int) -> dict:
    fields = PROTOCOL_FIELDS.get(protocol, {})
    for name, (check, wanted) in fields.items():
        if name not in record:
            raise TaskDataError(f"{where}: no {name!r}; every line of a {protocol} task needs {', '.join(fields)}")
        if not check(record[name], choices):
            raise TaskDataError(f"{where}: {name!r} must be {wanted}; got {record[name]!r}")
    return {name: record[name] for name in fields}


def read_items(
    path: Path, task_type: str, tokenizer, limit: int | None = None, protocol: str | None = None
) -> TaskFile:
    """Items of one mul or gen JSON-lines file (the first `limit` of them), with the fields the
    protocol needs."""
    second = "choices" if task_type == "mul" else "targets"
    records = _json_records(path, limit, f"inputs_pretokenized and {second}_pretokenized")
    parsed = [
        (where, record, _ids_or_text(record, "inputs", where, False), _ids_or_text(record, second, where, True))
        for where, record in records
    ]
    texts = [text for _, _, (_, text), _ in parsed if text is not None]
    texts += [t for _, _, _, (_, many) in parsed if many is not None for t in many]
    encoded = iter(encode_texts(tokenizer, texts))
    contexts = [ids if ids is not None else next(encoded) for _, _, (ids, _), _ in parsed]
    items = []
    for i, ((where, record, (ids, text), (many_ids, many_texts)), context) in enumerate(zip(parsed, contexts)):
        if many_ids is None:
            many_ids = [next(encoded) for _ in many_texts]
        text = text if text is not None else tokenizer.decode(ids)
        if any(len(c) == 0 for c in many_ids) or not many_ids:
            raise TaskDataError(
                f"{where}: every {second[:-1]} must encode to at least one token, and there must "
                f"be at least one; fix or drop the line"
            )
        meta = {k: v for k, v in record.items() if k in ("id", "few_shot_ids")}
        meta.update(_protocol_fields(record, where, protocol, len(many_ids)))
        item = Item(i, context, text, meta=meta)
        if task_type == "mul":
            label = record.get("label")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(many_ids):
                raise TaskDataError(
                    f"{where}: label must be the index of the right choice, 0..{len(many_ids) - 1}; got {label!r}"
                )
            item.choices, item.label = many_ids, label
            item.choice_texts = many_texts if many_texts is not None else [tokenizer.decode(c) for c in many_ids]
        else:
            item.targets = many_ids
        items.append(item)
    return TaskFile(path, sha256_file(path), items)


def read_lm_file(path: Path, tokenizer) -> TaskFile:
    """An lm file: raw text, encoded in one piece."""
    text = _read_text(path)
    if not text.strip():
        raise TaskDataError(f"{path} is empty; an lm task scores raw text")
    return TaskFile(path, sha256_file(path), [], text=text, tokens=encode_texts(tokenizer, [text])[0])


def read_documents(path: Path, tokenizer, limit: int | None = None) -> TaskFile:
    """A Pile-style file: one document an item (`context` its ids, `text` its text, `meta.subset`);
    empty documents are skipped, as the official code skips them."""
    items = []
    for where, record in _json_records(path, limit, "text_pretokenized (or text ids) and meta.pile_set_name"):
        ids, text = _ids_or_text(record, "text", where, False)
        if text is None:
            text = record.get("text_pretokenized")
            if not isinstance(text, str):
                raise TaskDataError(
                    f"{where}: give text_pretokenized with the text ids (its bytes are the BPB denominator)"
                )
        subset = (record.get("meta") or {}).get("pile_set_name", "all")
        items.append(
            Item(
                len(items),
                ids if ids is not None else encode_texts(tokenizer, [text])[0],
                text,
                meta={"subset": subset},
            )
        )
    return TaskFile(path, sha256_file(path), [item for item in items if item.context])


def read_task_file(
    path: Path, task_type: str, tokenizer, limit: int | None = None, protocol: str | None = None
) -> TaskFile:
    """`limit`: read only the first items (documents) of a file (a plain lm file is always read whole)."""
    if protocol == "pile":
        return read_documents(path, tokenizer, limit)
    if task_type == "lm":
        return read_lm_file(path, tokenizer)
    return read_items(path, task_type, tokenizer, limit, protocol)
