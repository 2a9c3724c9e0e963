"""`glm130b demo` end to end at a tiny size, offline: corpus from the shared sample, a few steps."""

import gzip
import json
import math
import re

import pytest

from glm130b.data.demo_corpus import DemoCorpus
from glm130b.data.sources import SourceSpec
from glm130b.demo import run_demo, unigram_cross_entropy
from tests.helpers import SHARED

SAMPLE = SHARED / "data/corpus/valid.jsonl.gz"
TINY = [
    "model_preset=glm-tiny",
    "model.max_sequence_length=64",
    "sequence_length=64",
    "train_samples=24",
    "micro_batch_size=4",
    "global_batch_size=8",
    "rampup_start_batch_size=4",
    "eval_every=2",
    "eval_batches=2",
    "checkpoint_every=2",
    "log_every=1",
]


@pytest.fixture
def local_corpus(tmp_path) -> DemoCorpus:
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is absent (the shared data folder sits beside the repository in CI)")
    documents = {"en": [], "zh": []}
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            record = json.loads(line)
            documents[record["lang"]].append(record["text"])
    specs = {"train": [], "valid": []}
    for lang, texts in documents.items():
        texts = texts[:300]  # en: 9 long documents, zh: many short ones
        held_out = max(1, len(texts) // 8)
        for split, part in (("train", texts[:-held_out]), ("valid", texts[-held_out:])):
            path = tmp_path / "texts" / f"{split}-{lang}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in part))
            specs[split].append(SourceSpec(f"sample-{lang}", path, lang))
    return DemoCorpus(specs["train"], specs["valid"], record={})


def test_demo_pipeline_writes_a_report_with_loss_baseline_and_checkpoint(tmp_path, local_corpus):
    report_path = run_demo(tmp_path / "demo", overrides=TINY, corpus=local_corpus, vocab_size=3200, show_progress=False)
    report = report_path.read_text()
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 1000
    assert "![loss curve](loss_curve.png)" in report
    rows = dict(re.findall(r"^\| (en|zh) \| ([0-9.]+) \|", report, flags=re.M))
    assert set(rows) == {"en", "zh"} and all(math.isfinite(float(v)) for v in rows.values())
    # glm-tiny's input dims (64, 160) take groups of 32 at most
    schemes = re.findall(
        r"^\| (fp32|INT8 row-wise|INT4 row-wise|INT4 group-\d+) \| ([0-9.]+) \| ([0-9.]+) \|$", report, flags=re.M
    )
    assert [s[0] for s in schemes] == ["fp32", "INT8 row-wise", "INT4 row-wise", "INT4 group-32"]
    prompts = re.findall(r"^Prompt: `(.*)`$", report, flags=re.M)
    assert prompts == ["KING HENRY. Now, lords, [gMASK]", "今天的新闻[gMASK]", "The king [MASK] the crown."]
    model_dir = re.search(r"Checkpoint .*: `([^`]+)`", report).group(1)
    from glm130b.checkpoint.model_dir import load_model

    assert load_model(model_dir).config.vocab_size == 3200


def test_unigram_cross_entropy_matches_a_direct_count():
    import numpy as np
    import torch

    from glm130b.objective.batch import TrainingBatch

    class Corpus:
        sources = ["a"]
        stream = np.array([1, 1, 2, 3], np.int32)

        def num_tokens(self, source):
            return len(self.stream)

        def window(self, source, start, length):
            return self.stream[start : start + length]

    targets = torch.tensor([[1, 3, 0]])
    batch = TrainingBatch(
        input_ids=targets,
        position_ids=targets,
        targets=targets,
        loss_mask=torch.tensor([[1.0, 1.0, 0.0]]),
        segment_ids=targets,
        in_prefix=targets.bool(),
    )
    # vocab 5, add-one: p(1) = 3/9, p(3) = 2/9; the unscored 0 does not count
    expected = -(math.log(3 / 9) + math.log(2 / 9)) / 2
    assert unigram_cross_entropy(Corpus(), [batch], 5) == pytest.approx(expected)
