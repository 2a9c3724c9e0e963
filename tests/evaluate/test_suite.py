"""The paper suite: converters over the real benchmark files (shared/data/eval) and `--suite paper`
end to end on a tiny byte-level model with --limit."""

import csv
import json

import pytest

from glm130b import cli
from glm130b.checkpoint.model_dir import save_model
from glm130b.evaluate import commands as evaluate_commands
from glm130b.evaluate.config import load_task
from glm130b.evaluate.suite import MMLU_GROUP, convert_all, suite_task_files
from glm130b.generate import loading
from tests.evaluate.helpers import ByteTokenizer, tiny_glm
from tests.helpers import SHARED

SOURCE = SHARED / "data" / "eval"
needs_data = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"benchmark data not found at {SOURCE}")


def test_suite_configs_parse_and_cover_the_paper():
    names = {load_task(path).name for path in suite_task_files("paper")}
    assert {
        "LAMBADA",
        "LAMBADA-loglikelihood",
        "MMLU",
        "C-Eval",
        "WikiText-2",
        "ARC-Easy",
        "PIQA",
        "HellaSwag",
    } <= names
    assert sum(n.startswith("FewCLUE-") for n in names) == 7
    lambada = load_task(next(p for p in suite_task_files("paper") if p.name == "lambada.yaml"))
    assert (lambada.num_beams, lambada.max_gen_length, lambada.use_task_mask, lambada.protocol) == (
        16,
        5,
        True,
        "lambada",
    )
    assert len(MMLU_GROUP) == 57


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not SOURCE.is_dir():
        pytest.skip(f"benchmark data not found at {SOURCE}")
    out = tmp_path_factory.mktemp("data")
    convert_all(SOURCE, out)
    return out


def first_record(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


@needs_data
def test_mmlu_five_shot_prompt_built_from_the_csv_files(converted):
    record = first_record(converted / "mmlu/stem/abstract_algebra.jsonl")
    with open(SOURCE / "mmlu/test/abstract_algebra_test.csv", encoding="utf-8", newline="") as f:
        question = next(csv.DictReader(f))
    with open(SOURCE / "mmlu/dev/abstract_algebra_dev.csv", encoding="utf-8", newline="") as f:
        shots = list(csv.DictReader(f))[:5]
    prompt = record["inputs_pretokenized"]
    assert prompt.startswith("The following are multiple choice questions about abstract algebra.\n\n")
    assert prompt.endswith(
        f"{question['question']}\n(A) {question['choice0']}\n(B) {question['choice1']}\n"
        f"(C) {question['choice2']}\n(D) {question['choice3']}\nAnswer: ("
    )
    for shot in shots:  # each example with its answer letter
        assert f"{shot['question']}\n(A) {shot['choice0']}" in prompt
        assert f"Answer: ({'ABCD'[int(shot['answer'])]})\n\n" in prompt
    assert record["choices_pretokenized"] == ["A", "B", "C", "D"] and record["label"] == int(question["answer"])
    assert record["few_shot_ids"] == [f"abstract_algebra/dev/{i}" for i in range(5)]
    assert sum(1 for _ in (converted / "mmlu").rglob("*.jsonl")) == 57


@needs_data
def test_lambada_hellaswag_and_fewclue_items(converted):
    with open(SOURCE / "lambada/lambada_test.jsonl", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    record = first_record(converted / "lambada/test.jsonl")
    assert record["inputs_pretokenized"] + " " + record["targets_pretokenized"][0] == text
    lines = (SOURCE / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()[:6]
    record = first_record(converted / "hellaswag/validation.jsonl")
    assert (record["inputs_pretokenized"], record["label"], record["choices_pretokenized"]) == (
        lines[0],
        int(lines[1]),
        lines[2:6],
    )
    record = first_record(converted / "fewclue/eprstmt/test_public.jsonl")
    assert record["choices_pretokenized"] == ["negative", "positive"] and record["label"] == 0  # "Negative"
    assert "呵呵了" in record["inputs_pretokenized"]


@needs_data
def test_suite_paper_runs_every_task(converted, tmp_path, monkeypatch, capsys):
    model_dir = save_model(tiny_glm(vocab=264, max_len=512), tmp_path / "model")
    (model_dir / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: ByteTokenizer())
    charts = []  # drawing 15 charts takes longer than scoring; test_commands checks a real one
    monkeypatch.setattr(evaluate_commands, "plot_groups", lambda task, path: charts.append(path))
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--suite",
                "paper",
                "--data-root",
                str(converted),
                "--limit",
                "2",
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "out/results.json").read_text())
    by_name = {t["name"]: t for t in results["tasks"]}
    assert len(by_name) == 15 and len(charts) == 15
    assert set(by_name["MMLU"]["groups"]) == {"stem", "social_sciences", "humanities", "other", "Overall"}
    assert set(by_name["WikiText-2"]["metrics"]) == {"PPL", "BPB"}
    assert by_name["MMLU"]["prompt_template"].startswith("The following are")
