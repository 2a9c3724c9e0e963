"""Contamination: GPT-3's normalisation and n-grams by hand, and `--decontaminate` over a prepared
corpus that holds some items (in other case and punctuation): exactly those are flagged, and the
clean score is the metric recomputed over the other items."""

import json

import pytest

from glm130b import cli
from glm130b.checkpoint.model_dir import save_model
from glm130b.data.prepare import prepare_corpus
from glm130b.evaluate.contamination import item_grams, normalized_words
from glm130b.generate import loading
from tests.evaluate.helpers import ByteTokenizer, load_byte_tokenizer, tiny_glm, write_jsonl

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def test_normalisation_and_grams():
    assert normalized_words("The CAT's hat, 2 dogs!") == ["the", "cat", "s", "hat", "2", "dogs"]
    assert normalized_words("我爱GLM-130B。") == ["我", "爱", "glm", "130b"]
    assert item_grams("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert item_grams("a, b", 3) == {("a", "b")}  # shorter than n: the whole item is one gram
    assert item_grams("...", 3) == set()


def sentence(start: int, length: int = 14) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)) + "."


@pytest.fixture
def setup(tmp_path, monkeypatch):
    items = [
        {"inputs_pretokenized": f"item {i}: " + sentence(i * 3), "choices_pretokenized": ["yes", "no"], "label": i % 2}
        for i in range(6)
    ]
    items.append(
        {"inputs_pretokenized": "一二三四五六七八九十百千万亿", "choices_pretokenized": ["是", "否"], "label": 0}
    )
    write_jsonl(tmp_path / "data/toy/test.jsonl", items)
    (tmp_path / "toy.yaml").write_text("name: toy\ntype: mul\npath: toy\n")
    docs = [
        {"text": "Some text. " + sentence(3).upper().replace(" ", ", ") + " More text."},  # item 1, other case/punct.
        {"text": "prefix " + sentence(12)},  # item 4
        {"text": " ".join(sentence(6).split()[:12])},  # 12 words of item 2 only
        {"text": "无关的文字一二三四五六七八九十百千万亿以及更多"},  # the Chinese item
    ]
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    prepare_corpus(
        [("docs", str(corpus_file), "en", 1.0)], tmp_path, tmp_path / "corpus", workers=1, loader=load_byte_tokenizer
    )
    model_dir = save_model(tiny_glm(vocab=264), tmp_path / "model")
    (model_dir / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: ByteTokenizer())
    return tmp_path, model_dir


def test_decontaminate_flags_overlapping_items_and_scores_the_rest(setup):
    root, model_dir = setup
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--tasks",
                str(root / "toy.yaml"),
                "--data-root",
                str(root / "data"),
                "--out",
                str(root / "out"),
                "--no-progress",
                "--decontaminate",
                str(root / "corpus"),
            ]
        )
        == 0
    )
    [task] = json.loads((root / "out/results.json").read_text())["tasks"]
    report = task["contamination"]
    assert report["contaminated_units"] == {"test.jsonl": [1, 4, 6]}
    assert report["fraction"] == pytest.approx(3 / 7) and report["ngram"] == 13
    records = task["files"]["test.jsonl"]["records"]
    clean = [r for r in records if r["index"] not in (1, 4, 6)]
    expected = 100 * sum(r["prediction"] == r["label"] for r in clean) / len(clean)
    assert report["clean"]["Accuracy"]["value"] == pytest.approx(expected)
    assert report["full"]["Accuracy"]["value"] == task["metrics"]["Accuracy"]["value"]
    assert "contaminated" in (root / "out/results.md").read_text()
