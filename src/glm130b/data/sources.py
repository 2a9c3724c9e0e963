"""Corpus sources: what a source is (`SourceSpec`, `parse_source_spec`), its input files, and
the readers that turn them into records and documents.

A record is one unit of input: a text file, a JSON line, a Parquet or dataset row. Readers yield
raw records cheaply (so a resumed run skips committed ones without parsing them); `parse_record`
turns one into a document text or a reason to skip it. Formats: docs/data.md, "Sources".
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from glm130b.core.config_io import check_field
from glm130b.data.errors import DataError

log = logging.getLogger(__name__)

SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
# What `save_to_disk` writes: a Dataset folder holds both of HF_MARKERS, a DatasetDict folder HF_SPLITS_MARKER.
HF_MARKERS = ("state.json", "dataset_info.json")
HF_SPLITS_MARKER = "dataset_dict.json"
# Rows per read from Parquet and datasets: enough to amortise the per-batch conversion to Python.
ROWS_PER_READ = 1024


@dataclass(frozen=True)
class SourceSpec:
    """One corpus source. `weight` is its share of the training mixture (normalised over the
    sources), independent of its size; `where` = (field, value) keeps only records with that
    field value (JSON lines, Parquet and datasets)."""

    name: str
    path: Path
    lang: str
    weight: float = 1.0
    text_field: str = "text"
    where: tuple[str, str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.where is not None:
            object.__setattr__(self, "where", tuple(self.where))
        if not SOURCE_NAME.fullmatch(self.name):
            raise DataError(
                f"source name {self.name!r} is not usable as a folder name: use letters, digits, '.', '_' and '-'"
            )
        check_field(
            f"source {self.name}: weight", self.weight, float, lambda v: v > 0 and math.isfinite(v), "a positive number"
        )
        if not self.lang:
            raise DataError(f"source {self.name}: give its language (e.g. lang=en)")

    def describe(self) -> dict:
        """The fields that decide the tokens (not the weight), as stored in the manifest."""
        return {
            "path": str(self.path.resolve()),
            "lang": self.lang,
            "text_field": self.text_field,
            "where": list(self.where) if self.where else None,
        }


SPEC_KEYS = ("name", "path", "lang", "weight", "text_field", "where")


def parse_source_spec(text: str) -> SourceSpec:
    """`name=en,lang=en,weight=1,path=data/en.jsonl.gz[,text_field=text][,where=lang:en]`.
    A comma is only a separator before one of the keys, so paths may contain commas."""
    parts = re.split(rf",(?=(?:{'|'.join(SPEC_KEYS)})=)", text)
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise DataError(
                f"cannot read source {text!r}: expected key=value pairs with keys "
                f"{', '.join(SPEC_KEYS)}, e.g. name=en,lang=en,weight=1,path=en.jsonl"
            )
        fields[key] = value
    missing = [k for k in ("name", "path", "lang") if k not in fields]
    if missing:
        raise DataError(f"source {text!r} lacks {', '.join(missing)}")
    where = None
    if "where" in fields:
        field, sep, value = fields["where"].partition(":")
        if not sep:
            raise DataError(f"source {fields['name']}: where={fields['where']!r} must be FIELD:VALUE")
        where = (field, value)
    try:
        weight = float(fields.get("weight", 1.0))
    except ValueError:
        raise DataError(f"source {fields['name']}: weight {fields['weight']!r} is not a number") from None
    return SourceSpec(
        fields["name"], Path(fields["path"]), fields["lang"], weight, fields.get("text_field", "text"), where
    )


def as_source_spec(source: SourceSpec | tuple | list) -> SourceSpec:
    """Accept a SourceSpec or a tuple (name, path, lang, weight)."""
    return source if isinstance(source, SourceSpec) else SourceSpec(*source)


@dataclass(frozen=True)
class InputFile:
    """One input of a source. Its size and modification time go into the manifest, so that a
    resumed run notices an input that changed."""

    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "hf"
    size: int
    mtime_ns: int


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / HF_SPLITS_MARKER).is_file() or all((path / m).is_file() for m in HF_MARKERS))


def _input_file(path: Path, kind: str) -> InputFile:
    if kind == "hf":  # a folder: its size and newest change over all its files
        stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
        return InputFile(path, kind, sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats))
    stat = path.stat()
    return InputFile(path, kind, stat.st_size, stat.st_mtime_ns)


def source_inputs(spec: SourceSpec) -> list[InputFile]:
    """The files of a source in reading order: the path itself, or every supported file under a
    folder in sorted order (a Hugging Face dataset folder counts as one input)."""
    path = spec.path
    if not path.exists():
        raise DataError(f"source {spec.name}: {path} does not exist; check the path")
    if _is_hf_dataset(path):
        return [_input_file(path, "hf")]
    if path.is_file():
        kind = _kind_of(path)
        if kind is None:
            raise DataError(
                f"source {spec.name}: cannot tell the format of {path}; name it *.txt, *.jsonl, "
                "*.json (JSON lines), optionally .gz, or *.parquet"
            )
        files = [_input_file(path, kind)]
    else:
        files, ignored = [], 0
        for p in sorted(path.rglob("*")):
            if p.is_file():
                kind = _kind_of(p)
                if kind is None:
                    ignored += 1
                else:
                    files.append(_input_file(p, kind))
        if ignored:
            log.warning(
                "source %s: ignored %d files under %s that are not .txt, .jsonl, .json, .gz or .parquet",
                spec.name,
                ignored,
                path,
            )
        if not files:
            raise DataError(f"source {spec.name}: {path} holds no .txt, .jsonl, .json(.gz) or .parquet files")
    if spec.where and any(f.kind == "text" for f in files):
        raise DataError(f"source {spec.name}: where= needs records with fields, but {path} holds plain text")
    return files


# ------------------------------------------------------------------------------ reading records
Advance = Callable[[int], None]
EXCLUDED = "excluded by where"


@dataclass(frozen=True)
class RawRecord:
    kind: str  # "text" | "jsonl" | "row"
    value: object  # Path (text), bytes (a JSON line), dict (a row)
    location: str  # file and line, for warnings


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(file: InputFile, advance: Advance) -> Iterator[RawRecord]:
    with open(file.path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if file.path.name.lower().endswith(".gz") else raw
        done = 0
        try:
            for number, line in enumerate(stream, 1):
                if line.strip():
                    yield RawRecord("jsonl", line, f"{file.path}:{number}")
                if number % 1024 == 0:  # progress in input bytes (compressed bytes for .gz)
                    advance(raw.tell() - done)
                    done = raw.tell()
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(f"{file.path} is damaged ({err}); download or write it again") from None
        advance(file.size - done)


def _columns(spec: SourceSpec) -> list[str]:
    return [spec.text_field] + ([spec.where[0]] if spec.where and spec.where[0] != spec.text_field else [])


def _check_columns(spec: SourceSpec, path: Path, available: list[str]) -> None:
    missing = [c for c in _columns(spec) if c not in available]
    if missing:
        raise DataError(
            f"source {spec.name}: {path} has no column {', '.join(missing)} (it has "
            f"{', '.join(available)}); set text_field= to the column holding the text"
        )


def _read_rows(
    file: InputFile, spec: SourceSpec, blocks: Iterable[dict], num_rows: int, advance: Advance
) -> Iterator[RawRecord]:
    """Records of the rows in `blocks` (column name -> values of ROWS_PER_READ consecutive rows)."""
    done = row = 0
    for block in blocks:
        columns = _columns(spec)
        for values in zip(*(block[c] for c in columns)):
            yield RawRecord("row", dict(zip(columns, values)), f"{file.path} row {row}")
            row += 1
        share = file.size * row // max(num_rows, 1)  # progress in bytes, pro rata over the rows
        advance(share - done)
        done = share


def _read_parquet(file: InputFile, spec: SourceSpec, advance: Advance) -> Iterator[RawRecord]:
    try:
        import pyarrow as pa  # deferred: an optional, heavy dependency needed for Parquet only
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {file.path} needs pyarrow: pip install 'glm130b[data]'") from None
    try:
        parquet = pq.ParquetFile(file.path)
        _check_columns(spec, file.path, parquet.schema_arrow.names)
        blocks = (b.to_pydict() for b in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=_columns(spec)))
        yield from _read_rows(file, spec, blocks, parquet.metadata.num_rows, advance)
    except pa.ArrowException as err:  # a file cut short or not Parquet at all
        raise DataError(
            f"{file.path} cannot be read as Parquet ({str(err).splitlines()[0]}); copy or write the file again"
        ) from None


def _read_hf(file: InputFile, spec: SourceSpec, advance: Advance) -> Iterator[RawRecord]:
    try:
        import datasets  # deferred: an optional, heavy dependency needed for dataset folders only
    except ImportError:
        raise DataError(f"{file.path} is a Hugging Face dataset; reading it needs `pip install datasets`") from None
    dataset = datasets.load_from_disk(str(file.path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(
            f"source {spec.name}: {file.path} holds several splits ({', '.join(dataset)}); point "
            f"path at one of them, e.g. {file.path / next(iter(dataset))}"
        )
    _check_columns(spec, file.path, dataset.column_names)
    yield from _read_rows(
        file, spec, dataset.select_columns(_columns(spec)).iter(batch_size=ROWS_PER_READ), dataset.num_rows, advance
    )


def read_raw_records(files: list[InputFile], spec: SourceSpec, advance: Advance) -> Iterator[RawRecord]:
    """The records of the files in order; `advance(n)` reports n more input bytes read."""
    for file in files:
        if file.kind == "text":
            yield RawRecord("text", file.path, str(file.path))
            advance(file.size)
        elif file.kind == "jsonl":
            yield from _read_jsonl(file, advance)
        elif file.kind == "parquet":
            yield from _read_parquet(file, spec, advance)
        else:
            yield from _read_hf(file, spec, advance)


def _valid_utf8(text: str) -> bool:
    """False for lone surrogates, which JSON escapes (\\ud800) can produce but no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_record(record: RawRecord, spec: SourceSpec) -> tuple[str | None, str | None]:
    """(text, None) for a document; (None, reason) for a record that is skipped."""
    if record.kind == "text":
        with _open_binary(record.value) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid UTF-8"
        fields = None
    elif record.kind == "jsonl":
        try:
            fields = json.loads(record.value.decode("utf-8"))
        except UnicodeDecodeError:
            return None, "invalid UTF-8"
        except json.JSONDecodeError:
            return None, "not valid JSON"
        if not isinstance(fields, dict):
            return None, "not a JSON object"
        text = fields.get(spec.text_field)
    else:
        fields, text = record.value, record.value.get(spec.text_field)
    if spec.where and fields is not None and str(fields.get(spec.where[0])) != spec.where[1]:
        return None, EXCLUDED
    if not isinstance(text, str):
        return None, f"no text in field {spec.text_field!r}"
    if not _valid_utf8(text):
        return None, "invalid UTF-8"
    if not text.strip():
        return None, "empty"
    return text, None
