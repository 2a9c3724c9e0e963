"""Pretraining corpora: `prepare_corpus` turns documents into memory-mapped token shards,
`TokenCorpus` reads them back.

A prepared corpus is a directory:

    manifest.json                 tokenizer fingerprint, dtype, weights, per-source counts and shards
    <source>/00000.tokens.npy     that source's documents, each followed by eos (uint16 or uint32)
    <source>/00000.docs.npy       int64 document start offsets into the shard, plus its end

Every file is written under a temporary name and renamed into place, shards first and the
manifest last, so the manifest only ever lists whole shards. A shard also records the range of
input records it covers; an interrupted run resumes after the last committed shard, so no
document is lost or written twice. Inputs: plain text (one document per file), JSON lines
(`.jsonl`, `.json`, optionally `.gz`), Parquet (needs pyarrow) and local Hugging Face datasets
saved with `save_to_disk` (needs datasets).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import math
import multiprocessing
import os
import re
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from glm130b.core.errors import GLMError
from glm130b.tokenizer.specials import SpecialTokens
from glm130b.tokenizer.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".prepare.lock"
FORMAT = "glm130b-token-corpus"
FORMAT_VERSION = 1
# 2**25 tokens is 128 MiB a shard at uint32: few files for a large corpus, little work lost
# when a run is interrupted.
DEFAULT_SHARD_TOKENS = 2**25
# Characters of text per task sent to a tokenizer worker: big enough that pickling overhead is
# small, small enough that every worker gets work on a corpus of a few MB.
BATCH_CHARS = 1 << 18
# A cap on documents per task too, so that a run of very short documents (one-line reviews) still
# makes tasks of bounded size.
MAX_DOCS_PER_BATCH = 4096
UINT16_VOCAB = 2**16  # ids 0..65535 fit uint16 shards, half the size of uint32
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
# What `save_to_disk` writes: a Dataset folder holds both of HF_MARKERS, a DatasetDict folder HF_SPLITS_MARKER.
HF_MARKERS = ("state.json", "dataset_info.json")
HF_SPLITS_MARKER = "dataset_dict.json"
# Warnings logged per source and skip reason before only the count is kept.
MAX_SKIP_WARNINGS = 5


class DataError(GLMError):
    """A corpus source or prepared corpus that cannot be used as asked."""


class CorpusTokenizer(Protocol):
    """What preparing a corpus needs of a tokenizer (glm130b.tokenizer.Tokenizer has it)."""

    specials: SpecialTokens
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def fingerprint(self) -> str: ...


# --------------------------------------------------------------------------------------------
# Sources


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
            raise DataError(f"source name {self.name!r} is not usable as a folder name: use letters, digits, "
                            "'.', '_' and '-'")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise DataError(f"source {self.name}: weight {self.weight} must be a positive number")
        if not self.lang:
            raise DataError(f"source {self.name}: give its language (e.g. lang=en)")

    def describe(self) -> dict:
        """The fields that decide the tokens (not the weight), as stored in the manifest."""
        return {"path": str(self.path.resolve()), "lang": self.lang, "text_field": self.text_field,
                "where": list(self.where) if self.where else None}


SPEC_KEYS = ("name", "path", "lang", "weight", "text_field", "where")


def parse_source_spec(text: str) -> SourceSpec:
    """`name=en,lang=en,weight=1,path=data/en.jsonl.gz[,text_field=text][,where=lang:en]`.
    A comma is only a separator before one of the keys, so paths may contain commas."""
    parts = re.split(rf",(?=(?:{'|'.join(SPEC_KEYS)})=)", text)
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise DataError(f"cannot read source {text!r}: expected key=value pairs with keys "
                            f"{', '.join(SPEC_KEYS)}, e.g. name=en,lang=en,weight=1,path=en.jsonl")
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
    return SourceSpec(fields["name"], Path(fields["path"]), fields["lang"], weight,
                      fields.get("text_field", "text"), where)


def as_source_spec(source: SourceSpec | tuple | list) -> SourceSpec:
    """Accept a SourceSpec or a tuple (name, path, lang, weight)."""
    return source if isinstance(source, SourceSpec) else SourceSpec(*source)


@dataclass(frozen=True)
class InputFile:
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
            raise DataError(f"source {spec.name}: cannot tell the format of {path}; name it *.txt, *.jsonl, "
                            "*.json (JSON lines), optionally .gz, or *.parquet")
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
            log.warning("source %s: ignored %d files under %s that are not .txt, .jsonl, .json, .gz or "
                        ".parquet", spec.name, ignored, path)
        if not files:
            raise DataError(f"source {spec.name}: {path} holds no .txt, .jsonl, .json(.gz) or .parquet files")
    if spec.where and any(f.kind == "text" for f in files):
        raise DataError(f"source {spec.name}: where= needs records with fields, but {path} holds plain text")
    return files


# --------------------------------------------------------------------------------------------
# Reading records
#
# A record is one unit of input: a text file, a JSON line, a Parquet or dataset row. Readers
# yield raw records cheaply (so a resumed run skips committed ones without parsing them);
# `parse_record` turns one into a document text or a reason to skip it.

Advance = Callable[[int], None]
EXCLUDED = "excluded by where"


@dataclass(frozen=True)
class RawRecord:
    kind: str
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
        raise DataError(f"source {spec.name}: {path} has no column {', '.join(missing)} (it has "
                        f"{', '.join(available)}); set text_field= to the column holding the text")


def _read_rows(file: InputFile, spec: SourceSpec, batches: Iterable[dict], num_rows: int,
               advance: Advance) -> Iterator[RawRecord]:
    done = row = 0
    for batch in batches:
        columns = _columns(spec)
        for values in zip(*(batch[c] for c in columns)):
            yield RawRecord("row", dict(zip(columns, values)), f"{file.path} row {row}")
            row += 1
        share = file.size * row // max(num_rows, 1)  # progress in bytes, pro rata over the rows
        advance(share - done)
        done = share


def _read_parquet(file: InputFile, spec: SourceSpec, advance: Advance) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {file.path} needs pyarrow: pip install 'glm130b[data]'") from None
    parquet = pq.ParquetFile(file.path)
    _check_columns(spec, file.path, parquet.schema_arrow.names)
    batches = (b.to_pydict() for b in parquet.iter_batches(batch_size=1024, columns=_columns(spec)))
    yield from _read_rows(file, spec, batches, parquet.metadata.num_rows, advance)


def _read_hf(file: InputFile, spec: SourceSpec, advance: Advance) -> Iterator[RawRecord]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{file.path} is a Hugging Face dataset; reading it needs `pip install datasets`") from None
    dataset = datasets.load_from_disk(str(file.path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"source {spec.name}: {file.path} holds several splits ({', '.join(dataset)}); point "
                        f"path at one of them, e.g. {file.path / next(iter(dataset))}")
    _check_columns(spec, file.path, dataset.column_names)
    yield from _read_rows(file, spec, dataset.select_columns(_columns(spec)).iter(batch_size=1024),
                          dataset.num_rows, advance)


def read_raw_records(files: list[InputFile], spec: SourceSpec, advance: Advance) -> Iterator[RawRecord]:
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


@dataclass
class Batch:
    """Consecutive records: `items` holds (record ordinal, skip reason or None) for each, `texts`
    the documents among them in order."""

    items: list[tuple[int, str | None]]
    texts: list[str]


def batch_records(records: Iterable[RawRecord], spec: SourceSpec, first_ordinal: int) -> Iterator[Batch]:
    warned: Counter = Counter()
    batch, chars = Batch([], []), 0
    for ordinal, record in enumerate(records, first_ordinal):
        text, reason = parse_record(record, spec)
        batch.items.append((ordinal, reason))
        if reason is None:
            batch.texts.append(text)
            chars += len(text)
        elif reason != EXCLUDED:
            warned[reason] += 1
            if warned[reason] <= MAX_SKIP_WARNINGS:
                log.warning("source %s: skipping %s (%s)%s", spec.name, record.location, reason,
                            "; further ones are only counted" if warned[reason] == MAX_SKIP_WARNINGS else "")
        if chars >= BATCH_CHARS or len(batch.texts) >= MAX_DOCS_PER_BATCH:
            yield batch
            batch, chars = Batch([], []), 0
    if batch.items:
        yield batch


# --------------------------------------------------------------------------------------------
# Tokenizing in worker processes

_worker_tokenizer: CorpusTokenizer | None = None


def _init_worker(loader: Callable[[str], CorpusTokenizer], tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = loader(tokenizer_dir)


def encode_flat(tokenizer: CorpusTokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The documents' ids concatenated and each one's length: one compact array crosses the
    process boundary instead of a list of Python ints per document."""
    encoded = tokenizer.encode_batch(texts) if texts else []
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _encode_in_worker(texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    return encode_flat(_worker_tokenizer, texts, dtype)


class BatchEncoder:
    """Tokenizes batches in order, in `workers` processes (each rebuilds the tokenizer from its
    directory) or, with workers <= 1, in this process. Yields each batch with its documents' ids."""

    def __init__(self, tokenizer: CorpusTokenizer, loader: Callable[[str], CorpusTokenizer], tokenizer_dir: str,
                 workers: int, dtype: np.dtype):
        self.tokenizer, self.workers, self.dtype, self.pool = tokenizer, workers, dtype, None
        if workers > 1:
            # forkserver: workers start from a clean process (no inherited threads) and the
            # preloaded data module is imported once, not per worker.
            # An executor, not multiprocessing.Pool: Pool.terminate() after a worker failure can
            # deadlock joining its handler threads; shutdown(cancel_futures=True) does not.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                            initargs=(loader, tokenizer_dir))

    def encode(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list[np.ndarray]]]:
        for batch, (flat, lengths) in self._encoded(batches):
            yield batch, np.split(flat, np.cumsum(lengths)[:-1])

    def _encoded(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, tuple[np.ndarray, np.ndarray]]]:
        if self.pool is None:
            for batch in batches:
                yield batch, encode_flat(self.tokenizer, batch.texts, self.dtype)
            return
        pending: deque = deque()  # bounded, so a large corpus is never read ahead into memory
        for batch in batches:
            pending.append((batch, self.pool.submit(_encode_in_worker, batch.texts, self.dtype)))
            if len(pending) >= 2 * self.workers:
                done, result = pending.popleft()
                yield done, result.result()
        while pending:
            done, result = pending.popleft()
            yield done, result.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: Path, write: Callable) -> None:
    """write(file) into a temporary name beside `path`, flush it to disk, then rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write(out_dir / MANIFEST_FILE, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode()))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32)


@dataclass
class ShardBuffer:
    """Documents tokenized since the last commit, with the counts that go with them."""

    tokens: list[np.ndarray]
    doc_lengths: list[int]
    skipped: Counter
    excluded: int = 0
    num_tokens: int = 0

    @classmethod
    def empty(cls) -> ShardBuffer:
        return cls([], [], Counter())



class _Lock:
    """An exclusive lock on a file in the corpus folder, so two runs never write one corpus. The
    kernel releases it when its process ends, so a killed run leaves no stale lock."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise DataError(f"another prepare is writing {self.path.parent}; wait for it to finish") from None
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def _plan(specs: list[SourceSpec], inputs: dict[str, list[InputFile]], tokenizer: CorpusTokenizer,
          shard_tokens: int) -> dict:
    """What decides the bytes of the corpus; a resumed run must have the same plan."""
    return {
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": int(tokenizer.vocab_size),
                      "eos": int(tokenizer.specials.eos)},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shard_tokens": shard_tokens,
        "sources": {s.name: {**s.describe(), "inputs": [{"path": str(f.path.resolve()), "size": f.size,
                                                         "mtime_ns": f.mtime_ns} for f in inputs[s.name]]}
                    for s in specs},
    }


def _plan_of(manifest: dict) -> dict:
    return {"tokenizer": manifest["tokenizer"], "dtype": manifest["dtype"], "shard_tokens": manifest["shard_tokens"],
            "sources": {n: {k: s[k] for k in ("path", "lang", "text_field", "where", "inputs")}
                        for n, s in manifest["sources"].items()}}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _fresh_manifest(plan: dict) -> dict:
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": False, **json.loads(json.dumps(plan))}
    for state in manifest["sources"].values():
        state.update(complete=False, records=0, documents=0, tokens=0, excluded=0, skipped={}, shards=[])
    return manifest


def _remove_prepared(out_dir: Path, manifest: dict) -> None:
    """Delete what an earlier preparation wrote (only the files its manifest lists), the manifest
    first: interrupted here, no manifest lists a deleted shard."""
    (out_dir / MANIFEST_FILE).unlink()
    for name, state in manifest["sources"].items():
        for shard in state["shards"]:
            for key in ("tokens_file", "docs_file"):
                (out_dir / shard[key]).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out_dir / name).rmdir()


def _remove_temporaries(out_dir: Path) -> None:
    for tmp in out_dir.glob("**/.*.tmp*"):
        tmp.unlink()


def prepare_corpus(sources: Iterable[SourceSpec | tuple], tokenizer_dir: str | Path, out_dir: str | Path,
                   workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   metadata: dict | None = None, overwrite: bool = False,
                   loader: Callable[[str], CorpusTokenizer] = load_tokenizer) -> dict:
    """Tokenize `sources` (SourceSpecs or (name, path, lang, weight) tuples) into `out_dir`.

    Run again after an interruption with the same arguments to finish the work; a finished corpus
    is left as it is (only weights and metadata are updated). `overwrite` replaces a corpus that
    was prepared from other sources or with another tokenizer (one with no documents written yet,
    e.g. after a wrong path, is replaced anyway). `loader(tokenizer_dir)` builds the
    tokenizer (in each worker process too). Returns the manifest."""
    specs = [as_source_spec(s) for s in sources]
    if not specs:
        raise DataError("no sources given; add at least one (name, path, lang, weight)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"source names must be unique, got {names}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    out_dir = Path(out_dir)
    tokenizer = loader(str(tokenizer_dir))
    inputs = {s.name: source_inputs(s) for s in specs}
    plan = _plan(specs, inputs, tokenizer, shard_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(out_dir):
        _remove_temporaries(out_dir)
        manifest = _read_manifest(out_dir) if (out_dir / MANIFEST_FILE).is_file() else None
        if manifest is not None and _plan_of(manifest) != plan:
            nothing_written = not any(state["documents"] for state in manifest["sources"].values())
            if not (overwrite or nothing_written):
                changes = "; ".join(_differences(_plan_of(manifest), plan))
                raise DataError(f"{out_dir} holds a corpus prepared differently ({changes}); use another output "
                                "folder, or overwrite=True (--overwrite) to replace it")
            _remove_prepared(out_dir, manifest)
            manifest = None
        if manifest is None:
            manifest = _fresh_manifest(plan)
        total_weight = sum(s.weight for s in specs)
        for spec in specs:
            manifest["sources"][spec.name]["weight"] = spec.weight / total_weight
        manifest["metadata"] = metadata or {}
        _write_manifest(out_dir, manifest)
        encoder = BatchEncoder(tokenizer, loader, str(tokenizer_dir), workers, np.dtype(plan["dtype"]))
        try:
            for spec in specs:
                if not manifest["sources"][spec.name]["complete"]:
                    _prepare_source(spec, inputs[spec.name], manifest, encoder, out_dir)
        finally:
            encoder.close()
        manifest["languages"] = _language_totals(manifest)
        manifest["complete"] = True
        _write_manifest(out_dir, manifest)
    return manifest


def _prepare_source(spec: SourceSpec, files: list[InputFile], manifest: dict, encoder: BatchEncoder,
                    out_dir: Path) -> None:
    state = manifest["sources"][spec.name]
    dtype = np.dtype(manifest["dtype"])
    eos = np.array([manifest["tokenizer"]["eos"]], dtype=dtype)
    (out_dir / spec.name).mkdir(exist_ok=True)
    buffer = ShardBuffer.empty()

    def commit(end: int) -> None:
        nonlocal buffer
        if buffer.doc_lengths:
            index = len(state["shards"])
            shard = {"tokens_file": f"{spec.name}/{index:05d}.tokens.npy",
                     "docs_file": f"{spec.name}/{index:05d}.docs.npy", "records": [state["records"], end],
                     "documents": len(buffer.doc_lengths), "tokens": buffer.num_tokens}
            tokens = np.concatenate(buffer.tokens)
            offsets = np.concatenate([[0], np.cumsum(buffer.doc_lengths)]).astype(np.int64)
            atomic_write(out_dir / shard["tokens_file"], lambda f: np.save(f, tokens))
            atomic_write(out_dir / shard["docs_file"], lambda f: np.save(f, offsets))
            state["shards"].append(shard)
        state["records"] = end
        state["documents"] += len(buffer.doc_lengths)
        state["tokens"] += buffer.num_tokens
        state["excluded"] += buffer.excluded
        state["skipped"] = dict(Counter(state["skipped"]) + buffer.skipped)
        _write_manifest(out_dir, manifest)
        buffer = ShardBuffer.empty()

    with tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc=f"{spec.name} ({spec.lang})",
              smoothing=0.1) as bar:
        records = read_raw_records(files, spec, bar.update)
        for _ in range(state["records"]):  # committed by an earlier run
            next(records)
        end = state["records"]
        for batch, token_lists in encoder.encode(batch_records(records, spec, state["records"])):
            documents = iter(token_lists)
            for ordinal, reason in batch.items:
                end = ordinal + 1
                if reason == EXCLUDED:
                    buffer.excluded += 1
                elif reason is not None:
                    buffer.skipped[reason] += 1
                else:
                    ids = next(documents)
                    buffer.tokens += [ids, eos]
                    buffer.doc_lengths.append(len(ids) + 1)
                    buffer.num_tokens += len(ids) + 1
                    if buffer.num_tokens >= manifest["shard_tokens"]:
                        commit(end)
        commit(end)
    if state["skipped"]:
        log.warning("source %s: skipped %d records (%s)", spec.name, sum(state["skipped"].values()),
                    ", ".join(f"{n} {reason}" for reason, n in sorted(state["skipped"].items())))
    if state["documents"] == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in state["skipped"].items()) or "no records"
        raise DataError(f"source {spec.name}: no documents in {spec.path} ({reasons}, {state['excluded']} "
                        "excluded by where); check the path, text_field and where")
    state["complete"] = True
    _write_manifest(out_dir, manifest)


def _language_totals(manifest: dict) -> dict:
    totals: dict[str, dict[str, int]] = {}
    for state in manifest["sources"].values():
        lang = totals.setdefault(state["lang"], {"documents": 0, "tokens": 0})
        lang["documents"] += state["documents"]
        lang["tokens"] += state["tokens"]
    return totals


# --------------------------------------------------------------------------------------------
# Reading a prepared corpus


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared corpus ({MANIFEST_FILE} is missing); "
                        "make one with `glm130b data prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); prepare the corpus again") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a {FORMAT} manifest of version {FORMAT_VERSION}; prepare the corpus again")
    return manifest


class TokenCorpus:
    """A prepared corpus, memory-mapped. Per source, `window` sees its documents concatenated,
    each followed by eos; `num_tokens` counts those eos tokens too. Arrays come back as int32."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        if not self.manifest["complete"]:
            raise DataError(f"{self.directory} is only partly prepared; run the same `glm130b data prepare` "
                            "command again to finish it")
        self._shards: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._ends: dict[str, np.ndarray] = {}
        for name, state in self.manifest["sources"].items():
            shards = [self._open_shard(shard) for shard in state["shards"]]
            self._shards[name] = shards
            self._ends[name] = np.cumsum([len(tokens) for tokens, _ in shards], dtype=np.int64)

    def _open_shard(self, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        try:
            tokens = np.load(self.directory / shard["tokens_file"], mmap_mode="r")
            offsets = np.load(self.directory / shard["docs_file"], mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{self.directory}: shard {shard['tokens_file']} cannot be read ({err}); prepare the "
                            "corpus again") from None
        if len(tokens) != shard["tokens"] or len(offsets) != shard["documents"] + 1:
            raise DataError(f"{self.directory}: shard {shard['tokens_file']} holds {len(tokens)} tokens and "
                            f"{len(offsets) - 1} documents, the manifest says {shard['tokens']} and "
                            f"{shard['documents']}; the corpus is damaged, prepare it again")
        return tokens, offsets

    @property
    def sources(self) -> list[str]:
        return list(self.manifest["sources"])

    @property
    def weights(self) -> dict[str, float]:
        return {name: state["weight"] for name, state in self.manifest["sources"].items()}

    @property
    def eos(self) -> int:
        return self.manifest["tokenizer"]["eos"]

    def _state(self, source: str) -> dict:
        if source not in self.manifest["sources"]:
            raise DataError(f"{self.directory} has no source {source!r}; it has {', '.join(self.sources)}")
        return self.manifest["sources"][source]

    def num_tokens(self, source: str) -> int:
        return self._state(source)["tokens"]

    def num_documents(self, source: str) -> int:
        return self._state(source)["documents"]

    def window(self, source: str, start: int, length: int) -> np.ndarray:
        """Tokens start..start+length-1 of the source's stream (documents each followed by eos)."""
        total = self.num_tokens(source)
        if start < 0 or length < 0 or start + length > total:
            raise IndexError(f"window [{start}, {start + length}) is outside source {source!r} of {total} tokens")
        ends, shards = self._ends[source], self._shards[source]
        pieces, position = [], start
        shard = int(np.searchsorted(ends, position, side="right"))
        while position < start + length:
            shard_start = int(ends[shard - 1]) if shard else 0
            take = min(start + length, int(ends[shard])) - position
            pieces.append(shards[shard][0][position - shard_start:position - shard_start + take])
            position += take
            shard += 1
        return np.concatenate(pieces).astype(np.int32) if pieces else np.empty(0, np.int32)

    def documents(self, source: str) -> Iterator[np.ndarray]:
        """Each document's tokens (without the eos that follows it in `window`), in input order."""
        self._state(source)
        for tokens, offsets in self._shards[source]:
            for begin, end in zip(offsets[:-1], offsets[1:]):
                yield np.array(tokens[begin:end - 1], dtype=np.int32)

    def check_tokenizer(self, tokenizer: CorpusTokenizer) -> None:
        """Refuse a tokenizer other than the one the corpus was prepared with."""
        expected = self.manifest["tokenizer"]
        found = {"fingerprint": tokenizer.fingerprint(), "vocab_size": int(tokenizer.vocab_size),
                 "eos": int(tokenizer.specials.eos)}
        if found != expected:
            changes = "; ".join(_differences(expected, found))
            raise DataError(f"{self.directory} was prepared with another tokenizer ({changes}); prepare it again "
                            "with this tokenizer, or use the tokenizer it was made with")


# --------------------------------------------------------------------------------------------
# Command line
