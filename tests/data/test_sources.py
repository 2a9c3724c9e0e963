"""Corpus sources (glm130b.data.sources): source specs, input formats, records that are skipped,
selection by field. Each input is prepared and read back; the reference is the stub tokenizer
applied to the documents directly."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from glm130b.core.errors import ConfigError
from glm130b.data.corpus import TokenCorpus
from glm130b.data.errors import DataError
from glm130b.data.sources import EXCLUDED, RawRecord, SourceSpec, parse_record, parse_source_spec
from tests.data.helpers import load_stub, prepare, random_texts, reference_stream, write_jsonl
from tests.helpers import SHARED


def test_source_spec_parsing():
    spec = parse_source_spec("name=en,lang=en,weight=0.5,path=/data/a,b.jsonl,where=lang:en")
    assert spec == SourceSpec("en", Path("/data/a,b.jsonl"), "en", 0.5, where=("lang", "en"))
    with pytest.raises(DataError, match="lacks lang"):
        parse_source_spec("name=en,path=x.jsonl")
    with pytest.raises(DataError, match="weight"):
        parse_source_spec("name=en,lang=en,path=x.jsonl,weight=heavy")
    with pytest.raises(DataError, match="folder name"):
        SourceSpec("../up", Path("x"), "en")


def test_hugging_face_dataset_folder(tmp_path, stub):
    datasets = pytest.importorskip("datasets", reason="reading datasets folders needs the optional `datasets`")
    texts = random_texts(25, 4)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "id": list(range(25))})})
    splits.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="several splits.*hf/train"):
        prepare([("a", tmp_path / "hf", "en", 1)], stub, tmp_path / "out")
    # the same output folder: the failed run wrote no documents, so the corrected one replaces it
    prepare([("a", tmp_path / "hf" / "train", "en", 1)], stub, tmp_path / "out")
    tok = load_stub(str(stub))
    assert [d.tolist() for d in TokenCorpus(tmp_path / "out").documents("a")] == [tok.encode(t) for t in texts]


def test_missing_path(tmp_path, stub):
    with pytest.raises(DataError, match="does not exist"):
        prepare([("a", tmp_path / "nowhere.jsonl", "en", 1)], stub, tmp_path / "out")


def test_empty_file_alone_is_an_error(tmp_path, stub):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"no documents .*1 empty"):
        prepare([("a", tmp_path / "empty.txt", "en", 1)], stub, tmp_path / "out")


def test_bad_records_are_skipped_counted_and_logged(tmp_path, stub, caplog):
    good = ["first", "second", "third"]
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"text": good[0]},
            b'{"text": "caf\xe9 in latin-1"}\n',  # invalid UTF-8
            b'{"text": "lone \\ud800 surrogate"}\n',  # valid JSON, not encodable text
            b"{broken json\n",
            {"text": "   "},  # empty
            {"body": "no text field"},
            {"text": good[1]},
        ],
    )
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "1.txt").write_text(good[2])
    (tmp_path / "dir" / "2.txt").write_bytes(b"\xff\xfe bad bytes")
    (tmp_path / "dir" / "3.txt").write_text("")
    (tmp_path / "dir" / "notes.md").write_text("not a corpus file")
    with caplog.at_level(logging.WARNING, logger="glm130b.data"):
        manifest = prepare(
            [("a", tmp_path / "a.jsonl", "en", 1), ("d", tmp_path / "dir", "en", 1)], stub, tmp_path / "out"
        )
    assert manifest["sources"]["a"]["skipped"] == {
        "invalid UTF-8": 2,
        "not valid JSON": 1,
        "empty": 1,
        "no text in field 'text'": 1,
    }
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


def test_where_selects_records_by_field(tmp_path, stub):
    records = [{"text": f"t{i}", "lang": "en" if i % 3 else "zh"} for i in range(30)]
    write_jsonl(tmp_path / "mixed.jsonl", records)
    manifest = prepare(
        [
            SourceSpec("en", tmp_path / "mixed.jsonl", "en", where=("lang", "en")),
            SourceSpec("zh", tmp_path / "mixed.jsonl", "zh", where=("lang", "zh")),
        ],
        stub,
        tmp_path / "out",
    )
    corpus, tok = TokenCorpus(tmp_path / "out"), load_stub(str(stub))
    for lang in ("en", "zh"):
        texts = [r["text"] for r in records if r["lang"] == lang]
        assert [d.tolist() for d in corpus.documents(lang)] == [tok.encode(t) for t in texts]
        assert manifest["sources"][lang]["excluded"] == 30 - len(texts)
        assert manifest["sources"][lang]["skipped"] == {}


@pytest.mark.skipif(not (SHARED / "data" / "corpus").is_dir(), reason="shared/data/corpus is not beside the repository")
def test_shared_corpus_split_by_language(tmp_path, stub):
    path = SHARED / "data" / "corpus" / "valid.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    manifest = prepare(
        [SourceSpec(lang, path, lang, where=("lang", lang)) for lang in ("en", "zh")], stub, tmp_path / "out", workers=2
    )
    corpus, tok = TokenCorpus(tmp_path / "out"), load_stub(str(stub))
    for lang in ("en", "zh"):
        texts = [r["text"] for r in records if r["lang"] == lang and r["text"].strip()]
        assert manifest["languages"][lang]["documents"] == len(texts) > 0
        np.testing.assert_array_equal(corpus.window(lang, 0, corpus.num_tokens(lang)), reference_stream(tok, texts))


def test_parse_record_reasons(tmp_path):
    """Each record kind gives its text, or the reason it is skipped; `where` excludes by field."""
    spec = SourceSpec("a", tmp_path, "en", where=("lang", "en"))
    row = lambda fields: parse_record(RawRecord("row", fields, "row 0"), spec)
    line = lambda data: parse_record(RawRecord("jsonl", data, "a.jsonl:1"), spec)
    assert row({"text": "hi", "lang": "en"}) == ("hi", None)
    assert row({"text": "hi", "lang": "zh"}) == (None, EXCLUDED)
    assert row({"text": None, "lang": "en"}) == (None, "no text in field 'text'")
    assert line(b'{"text": "x", "lang": "en"}\n') == ("x", None)
    assert line(b'["text"]\n') == (None, "not a JSON object")
    assert line(b'{"text": "\\ud800", "lang": "en"}\n') == (None, "invalid UTF-8")
    (tmp_path / "doc.txt.gz").write_bytes(gzip.compress(b"whole file\n"))
    plain = SourceSpec("b", tmp_path, "en")
    assert parse_record(RawRecord("text", tmp_path / "doc.txt.gz", "doc"), plain) == ("whole file\n", None)


def test_source_weight_must_be_a_positive_number(tmp_path):
    for weight in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="source a: weight must be a positive number"):
            SourceSpec("a", tmp_path, "en", weight)
    with pytest.raises(DataError, match="give its language"):
        SourceSpec("a", tmp_path, "")
