"""Reading a prepared corpus (glm130b.data.corpus.TokenCorpus): refusal of folders that are not
whole corpora."""

from __future__ import annotations

import pytest

from glm130b.data.corpus import TokenCorpus
from glm130b.data.errors import DataError
from tests.data.helpers import prepare, write_jsonl


def test_damaged_corpus_and_missing_manifest(tmp_path, stub):
    with pytest.raises(DataError, match="not a prepared corpus"):
        TokenCorpus(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}] * 20)
    manifest = prepare([("a", tmp_path / "a.jsonl", "en", 1)], stub, tmp_path / "out")
    shard = tmp_path / "out" / manifest["sources"]["a"]["shards"][0]["tokens_file"]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DataError, match="damaged|cannot be read"):
        TokenCorpus(tmp_path / "out")


def test_unreadable_or_foreign_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{cut off")
    with pytest.raises(DataError, match="not a readable manifest.*prepare the corpus again"):
        TokenCorpus(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(DataError, match="not a glm130b-token-corpus manifest"):
        TokenCorpus(tmp_path)
