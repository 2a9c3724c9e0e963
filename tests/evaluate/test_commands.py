"""`glm130b evaluate` end to end on a tiny model: official-format task files of the three types,
results JSON / Markdown / PNG, the reproducibility record, --limit, --compare, and bad input as one
line naming the file and the fix."""

import hashlib
import json
import math
import random

import pytest

from glm130b import cli
from glm130b.checkpoint.model_dir import save_model
from glm130b.generate import loading
from tests.evaluate.helpers import CharTokenizer, gen_records, mul_records, random_words, tiny_glm, write_jsonl

MUL_YAML = """name: "toy-mul"
type: "mul"
path: "toy/mul"
file-pattern:
  validation: "**/validation.jsonl"
  test: "**/test.jsonl"
micro-batch-size: 3
"""
GEN_YAML = """name: toy-gen
type: gen
path: toy/gen
max_gen_length: 4
use_task_mask: true
"""
LM_YAML = """name: toy-lm
type: lm
path: toy/lm
file-pattern: "*.txt"
generation-length: 16
max-seq-length: 64
use_task_mask: true
metrics: [PPL, BPB]
"""


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    model_dir = save_model(tiny_glm(), tmp_path / "model")
    (model_dir / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: CharTokenizer())
    data, tasks = tmp_path / "data", tmp_path / "tasks"
    write_jsonl(data / "toy/mul/a/validation.jsonl", mul_records(1, 7))
    write_jsonl(data / "toy/mul/a/test.jsonl", mul_records(2, 5, single_token=True))
    write_jsonl(data / "toy/gen/test.jsonl", gen_records(3, 4))
    (data / "toy/lm").mkdir(parents=True)
    (data / "toy/lm/doc.txt").write_text(random_words(random.Random(4), 60))
    tasks.mkdir()
    for name, text in (("mul", MUL_YAML), ("gen", GEN_YAML), ("lm", LM_YAML)):
        (tasks / f"{name}.yaml").write_text(text)
    return tmp_path, model_dir, data, tasks


def only_mul(tasks):
    (tasks / "gen.yaml").unlink()
    (tasks / "lm.yaml").unlink()


def run(model_dir, data, tasks, out, *extra):
    return cli.main(
        [
            "evaluate",
            "--model",
            str(model_dir),
            "--tasks",
            str(tasks),
            "--data-root",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_evaluate_writes_results_with_intervals_and_record(workspace, capsys):
    root, model_dir, data, tasks = workspace
    assert run(model_dir, data, tasks, root / "out") == 0
    results = json.loads((root / "out/results.json").read_text())
    by_name = {t["name"]: t for t in results["tasks"]}
    assert set(by_name) == {"toy-mul", "toy-gen", "toy-lm"}
    mul = by_name["toy-mul"]
    assert set(mul["groups"]) == {"validation", "test"}
    records = [r for f in mul["files"].values() for r in f["records"]]
    assert len(records) == 12
    accuracy = 100 * sum(r["prediction"] == r["label"] for r in records) / 12
    assert mul["metrics"]["Accuracy"]["value"] == pytest.approx(accuracy)
    low, high = mul["metrics"]["Accuracy"]["interval"]
    assert low <= accuracy <= high
    for r in records:  # the prediction is the first best summed log-prob
        assert r["prediction"] == r["log_probs"].index(max(r["log_probs"]))
    test_file = mul["files"]["a/test.jsonl"]
    assert test_file["sha256"] == hashlib.sha256((data / "toy/mul/a/test.jsonl").read_bytes()).hexdigest()
    gen = by_name["toy-gen"]
    assert set(gen["metrics"]) == {"EM", "F1"}
    assert all(
        r["references"] and isinstance(r["prediction"], str) for f in gen["files"].values() for r in f["records"]
    )
    lm = by_name["toy-lm"]
    nll = sum(r["nll"] for r in lm["files"]["doc.txt"]["records"])
    words = len((data / "toy/lm/doc.txt").read_text().strip().split(" "))
    assert lm["metrics"]["PPL"]["value"] == pytest.approx(math.exp(min(20, nll / words)))  # the official cap
    assert sum(r["tokens"] for r in lm["files"]["doc.txt"]["records"]) == len((data / "toy/lm/doc.txt").read_text())
    run_record = results["run"]
    assert run_record["package"]["version"] and "commit" in run_record["package"]
    assert run_record["model"]["quantization"] is None and run_record["model"]["dtype"] == "fp32"
    assert (root / "out/toy-mul.png").stat().st_size > 0
    table = (root / "out/results.md").read_text()
    assert "| toy-mul | all | Accuracy |" in table and "| toy-lm | all | PPL |" in table
    assert "toy-mul" in capsys.readouterr().out


def test_limit_quantized_and_compare(workspace, capsys):
    root, model_dir, data, tasks = workspace
    only_mul(tasks)
    assert run(model_dir, data, tasks, root / "a", "--limit", "6") == 0
    assert run(model_dir, data, tasks, root / "b", "--limit", "6", "--quantized", "int4") == 0
    b = json.loads((root / "b/results.json").read_text())
    assert b["run"]["model"]["quantization"] == "int4"
    assert sum(f["units"] for f in b["tasks"][0]["files"].values()) == 6  # 3 from each of the 2 files
    capsys.readouterr()
    assert cli.main(["evaluate", "--compare", str(root / "a"), str(root / "b")]) == 0
    out = capsys.readouterr().out
    assert "| toy-mul | Accuracy |" in out
    assert run(model_dir, data, tasks, root / "c", "--limit", "4") == 0
    assert cli.main(["evaluate", "--compare", str(root / "a"), str(root / "c")]) == 2
    assert "different data" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("type: mcq", "unknown task type 'mcq'"),
        ("path: toy/none", "no data file under"),
        ("name: [unclosed", "does not parse"),
        ("bogus-field: 1", "unknown field 'bogus-field'"),
    ],
)
def test_bad_task_config_is_one_line_naming_the_file(workspace, capsys, case, expected):
    root, model_dir, data, tasks = workspace
    only_mul(tasks)
    key = case.split(":")[0]
    text = "".join(line + "\n" for line in MUL_YAML.splitlines() if not line.startswith(key + ":")) + case + "\n"
    (tasks / "mul.yaml").write_text(text)
    assert run(model_dir, data, tasks, root / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and ("mul.yaml" in err)


def test_bad_data_is_one_line_naming_the_file_and_line(workspace, capsys):
    root, model_dir, data, tasks = workspace
    only_mul(tasks)
    bad = data / "toy/mul/a/test.jsonl"
    bad.write_text(bad.read_text() + '{"inputs_pretokenized": "x", "choices_pretokenized": ["a"], "label": 3}\n')
    assert run(model_dir, data, tasks, root / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:6: label must be" in err
    bad.write_text("not json\n")
    assert run(model_dir, data, tasks, root / "out") == 2
    assert f"{bad}:1 is not JSON" in capsys.readouterr().err


def test_a_choice_longer_than_the_context_window(workspace, capsys):
    root, model_dir, data, tasks = workspace
    only_mul(tasks)
    (tasks / "mul.yaml").write_text(MUL_YAML + "max_seq_length: 16\n")
    write_jsonl(
        data / "toy/mul/a/test.jsonl",
        [{"inputs_pretokenized": "abc", "label": 0, "choices_pretokenized": ["a" * 10, "b" * 8]}],
    )
    assert run(model_dir, data, tasks, root / "out") == 2
    err = capsys.readouterr().err
    assert "item 0: its choices take 18 tokens" in err and "raise max_seq_length" in err


def test_convert_and_compare_refuse_bad_paths(tmp_path, capsys):
    assert cli.main(["evaluate", "--convert", str(tmp_path / "nowhere"), "--data-root", str(tmp_path / "d")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert cli.main(["evaluate", "--convert", str(tmp_path / "src"), "--data-root", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lambada_test.jsonl is missing" in err
    (tmp_path / "a.json").write_text("[1, 2]")
    assert cli.main(["evaluate", "--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 2
    assert "is not a results file" in capsys.readouterr().err
