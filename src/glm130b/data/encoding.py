"""Tokenizing records: consecutive records cut into chunks (`chunk_records`), each chunk's documents
encoded in order by `ChunkEncoder`, in worker processes or in this one."""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from glm130b.data.manifest import CorpusTokenizer
from glm130b.data.sources import EXCLUDED, RawRecord, SourceSpec, parse_record

log = logging.getLogger(__name__)

# Characters of text per task sent to a tokenizer worker: big enough that pickling overhead is
# small, small enough that every worker gets work on a corpus of a few MB.
CHUNK_CHARS = 1 << 18
# A cap on documents per task too, so that a run of very short documents (one-line reviews) still
# makes tasks of bounded size.
MAX_DOCS_PER_CHUNK = 4096
# Warnings logged per source and skip reason before only the count is kept.
MAX_SKIP_WARNINGS = 5


@dataclass
class RecordChunk:
    """Consecutive records: `items` holds (record ordinal, skip reason or None) for each, `texts`
    the documents among them in order."""

    items: list[tuple[int, str | None]]
    texts: list[str]


def chunk_records(records: Iterable[RawRecord], spec: SourceSpec, first_ordinal: int) -> Iterator[RecordChunk]:
    """Parse the records (numbered from `first_ordinal`) and group them into chunks of about
    CHUNK_CHARS characters or MAX_DOCS_PER_CHUNK documents; skipped records are logged."""
    warned: Counter = Counter()
    chunk, chars = RecordChunk([], []), 0
    for ordinal, record in enumerate(records, first_ordinal):
        text, reason = parse_record(record, spec)
        chunk.items.append((ordinal, reason))
        if reason is None:
            chunk.texts.append(text)
            chars += len(text)
        elif reason != EXCLUDED:
            warned[reason] += 1
            if warned[reason] <= MAX_SKIP_WARNINGS:
                log.warning(
                    "source %s: skipping %s (%s)%s",
                    spec.name,
                    record.location,
                    reason,
                    "; further ones are only counted" if warned[reason] == MAX_SKIP_WARNINGS else "",
                )
        if chars >= CHUNK_CHARS or len(chunk.texts) >= MAX_DOCS_PER_CHUNK:
            yield chunk
            chunk, chars = RecordChunk([], []), 0
    if chunk.items:
        yield chunk


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


class ChunkEncoder:
    """Tokenizes chunks in order, in `workers` processes (each rebuilds the tokenizer from its
    directory) or, with workers <= 1, in this process. Yields each chunk with its documents' ids."""

    def __init__(
        self,
        tokenizer: CorpusTokenizer,
        loader: Callable[[str], CorpusTokenizer],
        tokenizer_dir: str,
        workers: int,
        dtype: np.dtype,
    ):
        self.tokenizer, self.workers, self.dtype, self.pool = tokenizer, workers, dtype, None
        if workers > 1:
            # forkserver: workers start from a clean process (no inherited threads) and this
            # module is preloaded once, not imported per worker.
            # An executor, not multiprocessing.Pool: Pool.terminate() after a worker failure can
            # deadlock joining its handler threads; shutdown(cancel_futures=True) does not.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(loader, tokenizer_dir)
            )

    def encode(self, chunks: Iterable[RecordChunk]) -> Iterator[tuple[RecordChunk, list[np.ndarray]]]:
        for chunk, (flat, lengths) in self._encoded(chunks):
            yield chunk, np.split(flat, np.cumsum(lengths)[:-1])

    def _encoded(self, chunks: Iterable[RecordChunk]) -> Iterator[tuple[RecordChunk, tuple[np.ndarray, np.ndarray]]]:
        if self.pool is None:
            for chunk in chunks:
                yield chunk, encode_flat(self.tokenizer, chunk.texts, self.dtype)
            return
        pending: deque = deque()  # bounded, so a large corpus is never read ahead into memory
        for chunk in chunks:
            pending.append((chunk, self.pool.submit(_encode_in_worker, chunk.texts, self.dtype)))
            if len(pending) >= 2 * self.workers:
                done, result = pending.popleft()
                yield done, result.result()
        while pending:
            done, result = pending.popleft()
            yield done, result.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
