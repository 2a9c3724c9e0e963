"""Preparing a corpus: `prepare_corpus` tokenizes sources into memory-mapped token shards under a
manifest, resuming an interrupted run where it stopped.

Every file is written atomically (glm130b.core.atomic), shards first and the manifest last, so the
manifest only ever lists whole shards. A shard records the range of input records it covers; a
rerun skips the committed records, so no document is lost or written twice. Layout and rules:
docs/data.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from glm130b.core.atomic import TEMPORARY_MARK, atomic_write
from glm130b.core.config_io import check_positive_int
from glm130b.data.encoding import ChunkEncoder, chunk_records
from glm130b.data.errors import DataError
from glm130b.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    CorpusTokenizer,
    differences,
    read_manifest,
    token_dtype,
    tokenizer_record,
    write_manifest,
)
from glm130b.data.sources import EXCLUDED, InputFile, SourceSpec, as_source_spec, read_raw_records, source_inputs
from glm130b.tokenizer.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

LOCK_FILE = ".prepare.lock"
# 2**25 tokens is 128 MiB a shard at uint32: few files for a large corpus, little work lost
# when a run is interrupted.
DEFAULT_SHARD_TOKENS = 2**25


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


class CorpusLock:
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


def _plan(
    specs: list[SourceSpec], inputs: dict[str, list[InputFile]], tokenizer: CorpusTokenizer, shard_tokens: int
) -> dict:
    """What decides the bytes of the corpus; a resumed run must have the same plan."""
    return {
        "tokenizer": tokenizer_record(tokenizer),
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shard_tokens": shard_tokens,
        "sources": {
            s.name: {
                **s.describe(),
                "inputs": [
                    {"path": str(f.path.resolve()), "size": f.size, "mtime_ns": f.mtime_ns} for f in inputs[s.name]
                ],
            }
            for s in specs
        },
    }


def _plan_of(manifest: dict) -> dict:
    return {
        "tokenizer": manifest["tokenizer"],
        "dtype": manifest["dtype"],
        "shard_tokens": manifest["shard_tokens"],
        "sources": {
            n: {k: s[k] for k in ("path", "lang", "text_field", "where", "inputs")}
            for n, s in manifest["sources"].items()
        },
    }


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
    """Files an interrupted run left under core.atomic's temporary names."""
    for tmp in out_dir.glob(f"**/.*{TEMPORARY_MARK}*"):
        tmp.unlink()


def prepare_corpus(
    sources: Iterable[SourceSpec | tuple],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    metadata: dict | None = None,
    overwrite: bool = False,
    loader: Callable[[str], CorpusTokenizer] = load_tokenizer,
) -> dict:
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
    check_positive_int("shard_tokens", shard_tokens)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    out_dir = Path(out_dir)
    tokenizer = loader(str(tokenizer_dir))
    inputs = {s.name: source_inputs(s) for s in specs}
    plan = _plan(specs, inputs, tokenizer, shard_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    with CorpusLock(out_dir):
        _remove_temporaries(out_dir)
        manifest = read_manifest(out_dir) if (out_dir / MANIFEST_FILE).is_file() else None
        if manifest is not None and _plan_of(manifest) != plan:
            nothing_written = not any(state["documents"] for state in manifest["sources"].values())
            if not (overwrite or nothing_written):
                changes = "; ".join(differences(_plan_of(manifest), plan))
                raise DataError(
                    f"{out_dir} holds a corpus prepared differently ({changes}); use another output "
                    "folder, or overwrite=True (--overwrite) to replace it"
                )
            _remove_prepared(out_dir, manifest)
            manifest = None
        if manifest is None:
            manifest = _fresh_manifest(plan)
        total_weight = sum(s.weight for s in specs)
        for spec in specs:
            manifest["sources"][spec.name]["weight"] = spec.weight / total_weight
        manifest["metadata"] = metadata or {}
        write_manifest(out_dir, manifest)
        encoder = ChunkEncoder(tokenizer, loader, str(tokenizer_dir), workers, np.dtype(plan["dtype"]))
        try:
            for spec in specs:
                if not manifest["sources"][spec.name]["complete"]:
                    _prepare_source(spec, inputs[spec.name], manifest, encoder, out_dir)
        finally:
            encoder.close()
        manifest["languages"] = _language_totals(manifest)
        manifest["complete"] = True
        write_manifest(out_dir, manifest)
    return manifest


def _prepare_source(
    spec: SourceSpec, files: list[InputFile], manifest: dict, encoder: ChunkEncoder, out_dir: Path
) -> None:
    state = manifest["sources"][spec.name]
    dtype = np.dtype(manifest["dtype"])
    eos = np.array([manifest["tokenizer"]["eos"]], dtype=dtype)
    (out_dir / spec.name).mkdir(exist_ok=True)
    buffer = ShardBuffer.empty()

    def commit(end: int) -> None:
        nonlocal buffer
        if buffer.doc_lengths:
            index = len(state["shards"])
            shard = {
                "tokens_file": f"{spec.name}/{index:05d}.tokens.npy",
                "docs_file": f"{spec.name}/{index:05d}.docs.npy",
                "records": [state["records"], end],
                "documents": len(buffer.doc_lengths),
                "tokens": buffer.num_tokens,
            }
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
        write_manifest(out_dir, manifest)
        buffer = ShardBuffer.empty()

    with tqdm(
        total=sum(f.size for f in files), unit="B", unit_scale=True, desc=f"{spec.name} ({spec.lang})", smoothing=0.1
    ) as bar:
        records = read_raw_records(files, spec, bar.update)
        for _ in range(state["records"]):  # committed by an earlier run
            next(records)
        end = state["records"]
        for chunk, token_lists in encoder.encode(chunk_records(records, spec, state["records"])):
            documents = iter(token_lists)
            for ordinal, reason in chunk.items:
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
        log.warning(
            "source %s: skipped %d records (%s)",
            spec.name,
            sum(state["skipped"].values()),
            ", ".join(f"{n} {reason}" for reason, n in sorted(state["skipped"].items())),
        )
    if state["documents"] == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in state["skipped"].items()) or "no records"
        raise DataError(
            f"source {spec.name}: no documents in {spec.path} ({reasons}, {state['excluded']} "
            "excluded by where); check the path, text_field and where"
        )
    state["complete"] = True
    write_manifest(out_dir, manifest)


def _language_totals(manifest: dict) -> dict:
    totals: dict[str, dict[str, int]] = {}
    for state in manifest["sources"].values():
        lang = totals.setdefault(state["lang"], {"documents": 0, "tokens": 0})
        lang["documents"] += state["documents"]
        lang["tokens"] += state["tokens"]
    return totals
