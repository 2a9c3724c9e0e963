"""Multiple-choice scoring variants against their definitions: per-token and per-byte means of the
summed log-probs, and calibration by the choice's log-prob after an empty context (a plain forward
of `[MASK, sop] + choice[:-1]`); the prediction is the first best score."""

import pytest

from glm130b.evaluate.config import task_from_mapping
from glm130b.evaluate.items import read_items
from glm130b.evaluate.multiple_choice import evaluate_file
from glm130b.evaluate.parallel import Executor
from tests.evaluate.helpers import TOK, CharTokenizer, mul_records, tiny_glm, write_jsonl
from tests.evaluate.test_packing import plain_log_probs


@pytest.mark.parametrize("scoring", ["sum", "token_mean", "byte_mean", "calibrated"])
def test_scoring_variants(scoring, tmp_path):
    model, tokenizer = tiny_glm(), CharTokenizer()
    write_jsonl(tmp_path / "t.jsonl", mul_records(21, 6))
    task_file = read_items(tmp_path / "t.jsonl", "mul", tokenizer)
    config = task_from_mapping({"name": "t", "type": "mul", "path": ".", "scoring": scoring}, "test")
    outcome = evaluate_file(task_file, config, model, tokenizer, Executor(progress=False))
    for item, record in zip(task_file.items, outcome.records):
        summed = [plain_log_probs(model, item.context + [TOK.mask], c)[0] for c in item.choices]
        assert record["log_probs"] == pytest.approx(summed, abs=1e-4)
        if scoring == "sum":
            expected = summed
        elif scoring == "token_mean":
            expected = [s / len(c) for s, c in zip(summed, item.choices)]
        elif scoring == "byte_mean":
            expected = [s / len(t.encode()) for s, t in zip(summed, item.choice_texts)]
        else:
            expected = [s - plain_log_probs(model, [TOK.mask], c)[0] for s, c in zip(summed, item.choices)]
        assert record["scores"] == pytest.approx(expected, abs=1e-4)
        assert record["prediction"] == expected.index(max(expected))


def test_micro_precision_recall_f1_equal_accuracy_on_single_label_items(tmp_path):
    model, tokenizer = tiny_glm(), CharTokenizer()
    write_jsonl(tmp_path / "t.jsonl", mul_records(22, 12, choices=3))
    task_file = read_items(tmp_path / "t.jsonl", "mul", tokenizer)
    metrics = ["Accuracy", "Precision", "Recall", "F1_mul"]
    config = task_from_mapping({"name": "t", "type": "mul", "path": ".", "metrics": metrics}, "test")
    outcome = evaluate_file(task_file, config, model, tokenizer, Executor(progress=False))
    right = sum(r["prediction"] == r["label"] for r in outcome.records)
    assert 0 < right < 12  # neither all nor none: a wrong count would show
    for metric in metrics:  # one label and one prediction per item: TP = right, predicted = actual = 12
        assert outcome.scores[metric].value() == pytest.approx(100 * right / 12), metric
    assert outcome.scores["F1_mul"].num == [2.0 * (r["prediction"] == r["label"]) for r in outcome.records]
    assert outcome.scores["F1_mul"].den == [2.0] * 12
