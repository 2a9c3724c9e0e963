"""Preparing a corpus (glm130b.data.prepare): read-back equals tokenizing directly across formats,
shards and worker processes; resume after a failure or a kill loses and repeats nothing; the lock,
reruns of a finished corpus, and corpora prepared differently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glm130b.core.errors import ConfigError
from glm130b.data import encoding
from glm130b.data.corpus import TokenCorpus
from glm130b.data.errors import DataError
from glm130b.data.manifest import MANIFEST_FILE
from glm130b.data.prepare import CorpusLock, prepare_corpus
from glm130b.data.sources import SourceSpec
from glm130b.tokenizer.tokenizers import load_tokenizer
from tests.data.helpers import REPO, load_stub, make_stub, prepare, random_texts, reference_stream, write_jsonl

# --------------------------------------------------------------------------------------------
# Reading back equals tokenizing directly


def test_read_back_equals_direct_tokenization_across_formats_and_shards(tmp_path, stub):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    en, zh, txt = random_texts(40, 0), random_texts(30, 1, "zh"), random_texts(5, 2)
    write_jsonl(tmp_path / "en.jsonl.gz", [{"text": t} for t in en], compress=True)
    pq.write_table(pa.table({"content": zh, "other": list(range(len(zh)))}), tmp_path / "zh.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(txt):  # one document per file, read in sorted name order
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    sources = [
        SourceSpec("en", tmp_path / "en.jsonl.gz", "en", 2.0),
        SourceSpec("zh", tmp_path / "zh.parquet", "zh", 1.0, text_field="content"),
        ("plain", tmp_path / "txt", "en", 1.0),
    ]
    # 97 tokens a shard: several shards per source; two workers: the pool path
    manifest = prepare(sources, stub, tmp_path / "out", workers=2, shard_tokens=97)
    tok = load_stub(str(stub))

    corpus = TokenCorpus(tmp_path / "out")
    assert corpus.sources == ["en", "zh", "plain"]
    assert corpus.weights == pytest.approx({"en": 0.5, "zh": 0.25, "plain": 0.25})
    assert manifest["dtype"] == "uint32"  # the character stub's vocabulary exceeds 2**16
    assert len(manifest["sources"]["en"]["shards"]) > 2
    rng = np.random.default_rng(0)
    for name, texts in (("en", en), ("zh", zh), ("plain", txt)):
        expected = reference_stream(tok, texts)
        assert [d.tolist() for d in corpus.documents(name)] == [tok.encode(t) for t in texts]
        assert corpus.num_tokens(name) == len(expected)
        assert corpus.num_documents(name) == len(texts)
        whole = corpus.window(name, 0, corpus.num_tokens(name))
        assert whole.dtype == np.int32
        np.testing.assert_array_equal(whole, expected)
        for _ in range(20):  # windows crossing shard boundaries
            start = int(rng.integers(0, len(expected) - 50))
            np.testing.assert_array_equal(corpus.window(name, start, 50), expected[start : start + 50])
    assert manifest["languages"] == {
        "en": {"documents": 45, "tokens": len(reference_stream(tok, en + txt))},
        "zh": {"documents": 30, "tokens": len(reference_stream(tok, zh))},
    }
    with pytest.raises(IndexError):
        corpus.window("en", corpus.num_tokens("en") - 1, 2)


def test_small_vocabulary_uses_uint16(tmp_path):
    stub = make_stub(tmp_path / "stub", mode="bytes")
    texts = ["héllo", "世界"]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    manifest = prepare([("a", tmp_path / "a.jsonl", "mixed", 1)], stub, tmp_path / "out")
    assert manifest["dtype"] == "uint16"
    assert np.load(tmp_path / "out" / manifest["sources"]["a"]["shards"][0]["tokens_file"]).dtype == np.uint16
    corpus = TokenCorpus(tmp_path / "out")
    np.testing.assert_array_equal(
        corpus.window("a", 0, corpus.num_tokens("a")), reference_stream(load_stub(str(stub)), texts)
    )


def test_real_tokenizer_in_worker_processes_round_trips(tmp_path, real_tokenizer_dir):
    texts = random_texts(50, 7) + random_texts(50, 8, "zh") + ["tab\tand  spaces\n\nnew lines"]
    write_jsonl(tmp_path / "mix.jsonl", [{"text": t} for t in texts])
    prepare_corpus(
        [("mix", tmp_path / "mix.jsonl", "mixed", 1)], real_tokenizer_dir, tmp_path / "out", workers=2, shard_tokens=500
    )
    tok = load_tokenizer(real_tokenizer_dir)
    corpus = TokenCorpus(tmp_path / "out")
    corpus.check_tokenizer(tok)
    documents = list(corpus.documents("mix"))
    assert [d.tolist() for d in documents] == tok.encode_batch(texts)
    assert [tok.decode(d.tolist()) for d in documents] == texts
    stream = corpus.window("mix", 0, corpus.num_tokens("mix"))
    assert (stream == tok.specials.eos).sum() == len(texts)


# --------------------------------------------------------------------------------------------
# Resume and atomicity


def resumable_sources(tmp_path: Path) -> list[SourceSpec]:
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in random_texts(60, 10)] + [b"not json\n"])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in random_texts(60, 11, "zh")], compress=True)
    return [SourceSpec("a", tmp_path / "a.jsonl", "en"), SourceSpec("b", tmp_path / "b.jsonl.gz", "zh")]


def assert_same_corpus(directory: Path, reference: Path) -> None:
    got, want = TokenCorpus(directory), TokenCorpus(reference)
    for name in want.sources:
        assert [d.tolist() for d in got.documents(name)] == [d.tolist() for d in want.documents(name)]
        for shard_got, shard_want in zip(
            got.manifest["sources"][name]["shards"], want.manifest["sources"][name]["shards"], strict=True
        ):
            assert shard_got == shard_want
            for key in ("tokens_file", "docs_file"):
                assert (directory / shard_got[key]).read_bytes() == (reference / shard_want[key]).read_bytes()
        assert got.manifest["sources"][name]["skipped"] == want.manifest["sources"][name]["skipped"]
    assert got.manifest["languages"] == want.manifest["languages"]
    assert not list(directory.glob("**/.*.tmp*"))


def test_resume_after_injected_failure_loses_and_repeats_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding, "MAX_DOCS_PER_CHUNK", 4)  # many small tasks, so shards commit before the failure
    sources = resumable_sources(tmp_path)
    clean = make_stub(tmp_path / "clean")
    prepare(sources, clean, tmp_path / "reference", shard_tokens=200)

    poisoned = make_stub(tmp_path / "poisoned", poison="zh doc 40:")  # fails in the middle of source b
    with pytest.raises(RuntimeError, match="injected failure"):
        prepare(sources, poisoned, tmp_path / "out", workers=2, shard_tokens=200)
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    b = manifest["sources"]["b"]
    assert not manifest["complete"] and manifest["sources"]["a"]["complete"] and not b["complete"]
    assert 0 < b["documents"] < 60 and b["records"] == b["shards"][-1]["records"][1]
    with pytest.raises(DataError, match="partly prepared"):
        TokenCorpus(tmp_path / "out")
    first_shard = tmp_path / "out" / b["shards"][0]["tokens_file"]
    written = first_shard.stat().st_mtime_ns

    prepare(sources, clean, tmp_path / "out", workers=2, shard_tokens=200)
    assert first_shard.stat().st_mtime_ns == written  # committed shards are kept, not made again
    assert_same_corpus(tmp_path / "out", tmp_path / "reference")


KILLED_RUN = """
import sys
sys.path.insert(0, {repo!r})
from glm130b.core.errors import ConfigError
from glm130b.data import encoding
from glm130b.data.prepare import prepare_corpus
from tests.data.helpers import load_stub
encoding.MAX_DOCS_PER_CHUNK = 2
prepare_corpus({sources!r}, {stub!r}, {out!r}, workers=1, shard_tokens=100, loader=load_stub)
"""


def test_resume_after_kill(tmp_path):
    sources = resumable_sources(tmp_path)
    prepare(sources, make_stub(tmp_path / "clean"), tmp_path / "reference", shard_tokens=100)
    slow = make_stub(tmp_path / "slow", delay=0.2)
    script = KILLED_RUN.format(
        repo=str(REPO),
        stub=str(slow),
        out=str(tmp_path / "out"),
        sources=[(s.name, str(s.path), s.lang, s.weight) for s in sources],
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    manifest_path = tmp_path / "out" / MANIFEST_FILE
    deadline = time.monotonic() + 120  # generous: only a limit on waiting, nothing is timed
    try:
        while True:
            assert process.poll() is None, f"prepare ended before it was killed: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no shard was committed within 120 s"
            if manifest_path.is_file() and len(json.loads(manifest_path.read_text())["sources"]["a"]["shards"]) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    partial = json.loads(manifest_path.read_text())
    assert not partial["complete"] and not partial["sources"]["a"]["complete"]

    prepare(sources, make_stub(tmp_path / "clean"), tmp_path / "out", shard_tokens=100)
    assert_same_corpus(tmp_path / "out", tmp_path / "reference")


def test_a_second_writer_is_refused(tmp_path, stub):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    (tmp_path / "out").mkdir()
    with CorpusLock(tmp_path / "out"):  # as a run in progress holds it
        with pytest.raises(DataError, match="another prepare is writing"):
            prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")
    prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")


def test_finished_corpus_is_kept_and_weights_updated(tmp_path, stub):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "three"}])
    prepare([("a", tmp_path / "a.jsonl", "en", 1), ("b", tmp_path / "b.jsonl", "en", 1)], stub, tmp_path / "out")
    shard = tmp_path / "out" / "a" / "00000.tokens.npy"
    written = shard.stat().st_mtime_ns
    prepare([("a", tmp_path / "a.jsonl", "en", 3), ("b", tmp_path / "b.jsonl", "en", 1)], stub, tmp_path / "out")
    assert shard.stat().st_mtime_ns == written
    assert TokenCorpus(tmp_path / "out").weights == pytest.approx({"a": 0.75, "b": 0.25})


def test_shard_tokens_must_be_positive(tmp_path, stub):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    with pytest.raises(ConfigError, match="shard_tokens must be a positive integer, got 0"):
        prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out", shard_tokens=0)


# --------------------------------------------------------------------------------------------
# A corpus prepared differently


def test_another_tokenizer_is_refused(tmp_path, stub):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")
    other = make_stub(tmp_path / "bytes", mode="bytes")
    with pytest.raises(DataError, match=r"prepared differently \(.*fingerprint.*--overwrite"):
        prepare([("a", tmp_path / "a.jsonl", "en", 1)], other, tmp_path / "out")
    corpus = TokenCorpus(tmp_path / "out")
    corpus.check_tokenizer(load_stub(str(stub)))
    with pytest.raises(DataError, match="another tokenizer"):
        corpus.check_tokenizer(load_stub(str(other)))
    prepare([("a", tmp_path / "a.jsonl", "en", 1)], other, tmp_path / "out", overwrite=True)
    TokenCorpus(tmp_path / "out").check_tokenizer(load_stub(str(other)))


def test_changed_input_is_refused_on_resume(tmp_path, stub):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}, {"text": "more"}])
    with pytest.raises(DataError, match=r"inputs"):
        prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")
