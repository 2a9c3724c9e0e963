"""Reading fine-tuning records: the three line formats, and every kind of bad line stopped with
one message naming the file and the line."""

import pytest

from glm130b.finetune.records import Record, RecordError, read_records
from tests.finetune.helpers import write_jsonl


def test_the_three_formats_give_prompt_and_target(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Q: 1+1? A:", "target": "2"},
            "",  # blank lines are skipped
            {"inputs_pretokenized": "Translate: chat", "targets_pretokenized": ["cat", "kitty"]},
            {
                "inputs_pretokenized": "Capital of France? Answer: ([MASK])",
                "choices_pretokenized": ["A", "B"],
                "label": 1,
            },
        ],
    )
    assert read_records(path) == [
        Record("Q: 1+1? A:", "2", f"{path}:1"),
        Record("Translate: chat", "cat", f"{path}:3"),
        Record("Capital of France? Answer: ([MASK])", "B", f"{path}:4"),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"}', "the field 'target' is missing"),
        ('{"target": "y"}', "the field 'prompt' is missing"),
        ('{"prompt": "x", "target": "  "}', "the target is empty"),
        ('{"prompt": 3, "target": "y"}', "prompt must be a string, got int"),
        ('{"prompt": "x", "target": "y"', "not valid JSON"),
        ('["x", "y"]', "must be a JSON object, got list"),
        ('{"question": "x"}', "no prompt and target"),
        ('{"inputs_pretokenized": "x", "targets_pretokenized": []}', "targets_pretokenized must be a non-empty list"),
        (
            '{"inputs_pretokenized": "x", "choices_pretokenized": ["a"], "label": 1}',
            "label must be the index of the right choice, 0..0",
        ),
        ('{"inputs_pretokenized": "x"}', "without targets_pretokenized or choices_pretokenized"),
    ],
)
def test_a_bad_line_is_one_message_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "a", "target": "b"}', line])
    with pytest.raises(RecordError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(RecordError, match="holds no records"):
        read_records(write_jsonl(tmp_path / "empty.jsonl", [""]))
