"""The built-in tasks of the paper's headline numbers, and converters from the benchmarks' own files
(the layout of shared/data/eval, described in docs/evaluation.md) to the toolkit's JSON lines.

Task configs ship in the official YAML format under glm130b/evaluate/tasks/<suite>/; each records
its prompt template. Converters write `<data-root>/<task path>/...`, one JSON object per item with
its `id` and, for few-shot prompts, the ids of the examples in it (`few_shot_ids`).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from glm130b.core.atomic import atomic_write_text
from glm130b.core.errors import GLMError

TASKS_DIR = Path(__file__).parent / "tasks"
SUITES = {"paper": TASKS_DIR / "paper"}
LETTERS = "ABCD"
SHOTS = 5  # MMLU and C-Eval are 5-shot in the paper
# MMLU's four categories (Hendrycks et al. 2021), the groups of the official MMLU config.
MMLU_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
    "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
    "prehistory professional_law world_religions",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
    "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
MMLU_GROUP = {subject: group for group, names in MMLU_CATEGORIES.items() for subject in names.split()}


def suite_task_files(suite: str) -> list[Path]:
    return sorted(SUITES[suite].glob("*.yaml"))


class SourceDataError(GLMError):
    """A benchmark source file that is missing or not in the expected layout."""


def _need(path: Path) -> Path:
    if not path.exists():
        raise SourceDataError(
            f"{path} is missing; --convert expects the layout of shared/data/eval (docs/evaluation.md, 'Data')"
        )
    return path


def _json_lines(path: Path) -> Iterator[dict]:
    for line in _need(path).read_text(encoding="utf-8").split("\n"):
        if line.strip():
            yield json.loads(line)


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------ few-shot exams
def exam_question(question: str, options: list[str], answer_prefix: str) -> str:
    lines = [question] + [f"({letter}) {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join(lines) + f"\n{answer_prefix}("


def exam_prompt(
    header: str, shots: list[tuple[str, list[str], int]], question: tuple[str, list[str]], answer_prefix: str
) -> str:
    """`header`, then each example question with its answer `(X)`, then the question ending in
    `Answer: (` (the letter is scored at the [MASK] appended after it)."""
    parts = [header]
    for q, options, answer in shots:
        parts.append(exam_question(q, options, answer_prefix) + f"{LETTERS[answer]})\n\n")
    parts.append(exam_question(*question, answer_prefix))
    return "".join(parts)


def _exam_rows(path: Path, question: str, options: list[str], answer: str, to_index: Callable) -> list[tuple]:
    with open(_need(path), encoding="utf-8", newline="") as f:
        return [(row[question], [row[o] for o in options], to_index(row[answer])) for row in csv.DictReader(f)]


def convert_mmlu(source: Path, out: Path) -> list[Path]:
    written = []
    for test_file in sorted(_need(source / "mmlu" / "test").glob("*_test.csv")):
        subject = test_file.name.removesuffix("_test.csv")
        columns = ("question", [f"choice{i}" for i in range(4)], "answer", int)
        dev = _exam_rows(source / "mmlu" / "dev" / f"{subject}_dev.csv", *columns)[:SHOTS]
        header = f"The following are multiple choice questions about {subject.replace('_', ' ')}.\n\n"
        records = [
            {
                "inputs_pretokenized": exam_prompt(header, dev, (q, options), "Answer: "),
                "choices_pretokenized": list(LETTERS),
                "label": label,
                "id": f"{subject}/test/{i}",
                "few_shot_ids": [f"{subject}/dev/{j}" for j in range(len(dev))],
            }
            for i, (q, options, label) in enumerate(_exam_rows(test_file, *columns))
        ]
        written.append(_write(out / "mmlu" / MMLU_GROUP.get(subject, "other") / f"{subject}.jsonl", records))
    return written


def convert_ceval(source: Path, out: Path) -> list[Path]:
    written = []
    for val_file in sorted(_need(source / "ceval" / "val").glob("*_val.csv")):
        subject = val_file.name.removesuffix("_val.csv")
        columns = ("question", list(LETTERS), "answer", LETTERS.index)
        dev = _exam_rows(source / "ceval" / "dev" / f"{subject}_dev.csv", *columns)[:SHOTS]
        header = f"以下是关于{subject.replace('_', ' ')}的单项选择题，请选出正确答案。\n\n"
        records = [
            {
                "inputs_pretokenized": exam_prompt(header, dev, (q, options), "答案："),
                "choices_pretokenized": list(LETTERS),
                "label": label,
                "id": f"{subject}/val/{i}",
                "few_shot_ids": [f"{subject}/dev/{j}" for j in range(len(dev))],
            }
            for i, (q, options, label) in enumerate(_exam_rows(val_file, *columns))
        ]
        written.append(_write(out / "ceval" / f"{subject}.jsonl", records))
    return written


# ------------------------------------------------------------------------------ FewCLUE, zero-shot
YES_NO = ["No", "Yes"]


def _tnews_labels(source: Path) -> dict[str, tuple[int, str]]:
    labels = [
        json.loads(line)
        for line in _need(source / "fewclue" / "tnews" / "label_index2en2zh.json")
        .read_text(encoding="utf-8")
        .splitlines()
        if line.strip()
    ]
    return {
        entry["label"]: (i, entry["label_desc"].removeprefix("news_").replace("_", " "))
        for i, entry in enumerate(labels)
    }


def fewclue_item(task: str, r: dict, tnews: dict) -> tuple[str, list[str], int] | None:
    """English prompt, choices and label of one FewCLUE record (None: a record without a usable label)."""
    if task == "eprstmt":
        return (
            f"{r['sentence']}\nQuestion: Is this review positive or negative?\nAnswer:",
            ["negative", "positive"],
            ["Negative", "Positive"].index(r["label"]),
        )
    if task == "bustm":
        return (
            f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nQuestion: Do the two sentences mean "
            "the same thing? Yes or No?\nAnswer:",
            YES_NO,
            int(r["label"]),
        )
    if task == "ocnli":
        order = ["entailment", "neutral", "contradiction"]
        if r["label"] not in order:
            return None
        return (
            f'{r["sentence1"]}\nQuestion: Does this mean that "{r["sentence2"]}"? Yes, Maybe or No?\nAnswer:',
            ["Yes", "Maybe", "No"],
            order.index(r["label"]),
        )
    if task == "csl":
        return (
            f"Abstract: {r['abst']}\nKeywords: {', '.join(r['keyword'])}\nQuestion: Are all of these keywords "
            "keywords of the abstract? Yes or No?\nAnswer:",
            YES_NO,
            int(r["label"]),
        )
    if task == "cluewsc":
        t = r["target"]
        return (
            f'{r["text"]}\nQuestion: In the passage above, does "{t["span2_text"]}" refer to '
            f'"{t["span1_text"]}"? Yes or No?\nAnswer:',
            YES_NO,
            int(r["label"] == "true"),
        )
    if task == "tnews":
        index, _ = tnews[str(r["label"])]
        return (
            f"{r['sentence']}\nQuestion: What is the topic of this news headline?\nAnswer:",
            [name for _, name in sorted(tnews.values())],
            index,
        )
    if task == "chid":
        return (
            f"{r['content'].replace('#idiom#', '____')}\nQuestion: Which idiom fills the blank?\nAnswer:",
            list(r["candidates"]),
            int(r["answer"]),
        )
    raise ValueError(task)


FEWCLUE_TASKS = ("eprstmt", "bustm", "ocnli", "csl", "cluewsc", "tnews", "chid")


def convert_fewclue(source: Path, out: Path) -> list[Path]:
    tnews = _tnews_labels(source)
    written = []
    for task in FEWCLUE_TASKS:
        for split in ("dev_few_all", "test_public"):
            records = []
            for i, r in enumerate(_json_lines(source / "fewclue" / task / f"{split}.json")):
                built = fewclue_item(task, r, tnews)
                if built is not None:
                    records.append(
                        {
                            "inputs_pretokenized": built[0],
                            "choices_pretokenized": built[1],
                            "label": built[2],
                            "id": f"{task}/{split}/{r.get('id', r.get('idx', i))}",
                        }
                    )
            written.append(_write(out / "fewclue" / task / f"{split}.jsonl", records))
    return written


# ------------------------------------------------------------------------------ English
def convert_english(source: Path, out: Path) -> list[Path]:
    written = []
    for name, split in (("arc_easy", "test"), ("piqa", "validation")):
        records = [
            {
                "inputs_pretokenized": r["query"].rstrip("\n") + "\nAnswer:",
                "choices_pretokenized": r["choices"],
                "label": r["gold"],
                "id": f"{name}/{split}/{i}",
            }
            for i, r in enumerate(_json_lines(source / "english" / f"{name}.jsonl"))
        ]
        written.append(_write(out / name / f"{split}.jsonl", records))
    lines = _need(source / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()
    if len(lines) % 6:
        raise SourceDataError(
            f"{source / 'hellaswag'}: {len(lines)} lines is not 6 per item (context, gold, 4 endings)"
        )
    records = [
        {
            "inputs_pretokenized": lines[k],
            "choices_pretokenized": lines[k + 2 : k + 6],
            "label": int(lines[k + 1]),
            "id": f"hellaswag/validation/{k // 6}",
        }
        for k in range(0, len(lines), 6)
    ]
    written.append(_write(out / "hellaswag" / "validation.jsonl", records))
    return written


def convert_lambada(source: Path, out: Path) -> list[Path]:
    """Context: the passage without its last word; target: that word."""
    records = []
    for i, r in enumerate(_json_lines(source / "lambada" / "lambada_test.jsonl")):
        context, word = r["text"].rsplit(" ", 1)
        records.append({"inputs_pretokenized": context, "targets_pretokenized": [word], "id": f"lambada/test/{i}"})
    return [_write(out / "lambada" / "test.jsonl", records)]


def convert_wikitext2(source: Path, out: Path) -> list[Path]:
    target = out / "wikitext2" / "wiki.test.raw"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_need(source / "wikitext2" / "wiki.test.raw"), target)
    return [target]


CONVERTERS = (convert_lambada, convert_mmlu, convert_ceval, convert_fewclue, convert_english, convert_wikitext2)


def convert_all(source: str | Path, out: str | Path) -> list[Path]:
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise SourceDataError(
            f"--convert {source} is not a folder; give the benchmark data folder (the layout of shared/data/eval)"
        )
    return [path for convert in CONVERTERS for path in convert(source, out)]
