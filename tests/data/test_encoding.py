"""Cutting records into chunks and tokenizing them (glm130b.data.encoding)."""

from __future__ import annotations

import json

import numpy as np

from glm130b.data import encoding
from glm130b.data.encoding import ChunkEncoder, chunk_records, encode_flat
from glm130b.data.sources import EXCLUDED, RawRecord, SourceSpec
from tests.data.helpers import load_stub, random_texts


def jsonl_records(records: list[dict]) -> list[RawRecord]:
    return [RawRecord("jsonl", (json.dumps(r) + "\n").encode(), f"a.jsonl:{i + 1}") for i, r in enumerate(records)]


def test_chunks_cover_every_record_once_in_order(tmp_path, monkeypatch):
    """Ordinals run on from `first_ordinal` without gaps across chunks; each chunk holds at most
    MAX_DOCS_PER_CHUNK documents, about CHUNK_CHARS characters, and its documents in order."""
    monkeypatch.setattr(encoding, "MAX_DOCS_PER_CHUNK", 3)
    monkeypatch.setattr(encoding, "CHUNK_CHARS", 100)
    texts = random_texts(40, 1)
    records = [{"text": t, "lang": "en" if i % 4 else "zh"} for i, t in enumerate(texts)] + [
        {"body": "x", "lang": "en"}
    ]
    spec = SourceSpec("a", tmp_path, "en", where=("lang", "en"))
    chunks = list(chunk_records(jsonl_records(records), spec, first_ordinal=7))
    ordinals = [o for c in chunks for o, _ in c.items]
    assert ordinals == list(range(7, 7 + len(records)))
    assert all(len(c.texts) <= 3 for c in chunks)
    assert all(sum(map(len, c.texts[:-1])) < 100 for c in chunks)  # a chunk closes once it reaches 100
    kept = [t for i, t in enumerate(texts) if i % 4]
    assert [t for c in chunks for t in c.texts] == kept
    reasons = [r for c in chunks for _, r in c.items]
    assert reasons.count(EXCLUDED) == 10 and reasons[-1] == "no text in field 'text'"


def test_encoder_returns_each_chunks_ids_in_process_and_in_workers(tmp_path):
    stub_dir = tmp_path / "stub"
    stub_dir.mkdir()
    (stub_dir / "stub.json").write_text(json.dumps({"mode": "bytes"}))
    tok = load_stub(str(stub_dir))
    spec = SourceSpec("a", tmp_path, "en")
    texts = random_texts(30, 2, "zh")
    flat, lengths = encode_flat(tok, texts, np.dtype(np.uint16))
    assert flat.dtype == np.uint16 and lengths.tolist() == [len(tok.encode(t)) for t in texts]
    for workers in (1, 2):
        encoder = ChunkEncoder(tok, load_stub, str(stub_dir), workers, np.dtype(np.uint16))
        try:
            chunks = chunk_records(jsonl_records([{"text": t} for t in texts]), spec, 0)
            got = [ids.tolist() for chunk, token_lists in encoder.encode(chunks) for ids in token_lists]
        finally:
            encoder.close()
        assert got == [tok.encode(t) for t in texts]
