"""The official Pile task (`module: tasks.language-modeling.pile.Pile`): bits per byte per subset and
pooled, every document windowed on its own, against plain forwards of `[gMASK, sop] + doc[:-1]`."""

import json
import math

import pytest

from glm130b.evaluate.config import load_task
from glm130b.evaluate.parallel import Executor
from glm130b.evaluate.runner import evaluate_task
from tests.evaluate.helpers import TOK, CharTokenizer, tiny_glm
from tests.evaluate.test_packing import plain_log_probs

PILE_YAML = """name: "Pile"
type: "lm"
module: "tasks.language-modeling.pile.Pile"
path: "pile"
file-pattern:
  test: "**/test_tokenized.jsonl"
generation-length: 16
max-seq-length: 48
use_task_mask: true
"""


def test_pile_bits_per_byte_per_subset(tmp_path):
    tokenizer, model = CharTokenizer(), tiny_glm()
    docs = [
        ("the cat sat on the mat.", "books"),
        ("a dog ran far away!", "web"),
        ("", "web"),
        ("birds sing in the early morning light.", "books"),
    ]
    lines = [{"text_pretokenized": text, "meta": {"pile_set_name": subset}} for text, subset in docs]
    lines[1]["text"] = tokenizer.encode(docs[1][0])  # the official id form is read as it is
    (tmp_path / "data/pile").mkdir(parents=True)
    (tmp_path / "data/pile/test_tokenized.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "pile.yaml").write_text(PILE_YAML)
    result = evaluate_task(
        load_task(tmp_path / "pile.yaml"), tmp_path / "data", model, tokenizer, Executor(progress=False)
    )
    entry = result["files"]["test_tokenized.jsonl"]
    nll = {}
    for text, subset in docs:
        if text:  # each document fits one window: all its tokens scored after [gMASK] <sop>
            ids = tokenizer.encode(text)
            nll.setdefault(subset, []).append((-plain_log_probs(model, [TOK.gmask], ids)[0], len(text.encode())))
    for subset, parts in nll.items():
        expected = sum(n for n, _ in parts) / sum(b for _, b in parts) / math.log(2)
        assert entry["breakdown"][subset]["BPB"]["value"] == pytest.approx(expected, rel=1e-5)
        # one file: the task's per-subset score pooled over files is the file's
        assert result["breakdown"][subset]["pooled"]["BPB"]["value"] == pytest.approx(expected, rel=1e-5)
        assert result["breakdown"][subset]["units"] == len(parts)  # windows: each document fits one
    pooled = sum(n for p in nll.values() for n, _ in p) / sum(b for p in nll.values() for _, b in p) / math.log(2)
    assert result["metrics"]["BPB"]["value"] == pytest.approx(pooled, rel=1e-5)
    assert len(entry["records"]) == 3  # the empty document is skipped
