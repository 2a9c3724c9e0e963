"""`glm130b finetune`, `glm130b generate --adapter` and `glm130b merge-adapter` end to end, and
bad input as one line on stderr naming the file and line."""

import argparse

import pytest

from glm130b.adapters.folder import freeze, save_adapter
from glm130b.adapters.prefix import add_prefix
from glm130b.checkpoint.model_dir import load_model
from glm130b.cli.commands import main
from glm130b.evaluate.loading import load_for_evaluation
from glm130b.generate.api import generate_text
from glm130b.serve.commands import load_for_serving
from tests.finetune.helpers import RUN, write_jsonl


def train_flags(**overrides) -> list[str]:
    return [x for k, v in {**RUN, **overrides}.items() for x in (f"--train.{k}", str(v))]


def test_finetune_then_generate_with_the_adapter_and_with_the_merged_model(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(task.base),
                "--data",
                str(task.train),
                "--valid-data",
                str(task.held),
                "--method",
                "lora",
                "--lora-targets",
                "query_key_value,dense",
                "--out-dir",
                str(out),
                "--merge",
                *train_flags(lr=1e-2, train_samples=800),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"adapter: {out / 'adapter'} (6,144 trained parameters)" in printed  # 2 layers x rank 8 x (h + 3h, h + h)
    assert f"merged model: {out / 'merged'}" in printed
    score = float(printed.split("exact match on")[1].split(":")[1].split("%")[0])
    assert score >= 90

    for flags in (
        ["--checkpoint", str(task.base), "--adapter", str(out / "adapter")],
        ["--checkpoint", str(out / "merged")],
    ):
        assert main(["generate", *flags, "--device", "cpu", "--no-stream", "--max-new-tokens", "5", "abch"]) == 0
        assert capsys.readouterr().out == "abchbcda\n"  # the prompt, then its shift
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(task.base),
                "--device",
                "cpu",
                "--no-stream",
                "--max-new-tokens",
                "5",
                "abch",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "abchabch\n"  # the base copies

    # the same adapter through the evaluation toolkit's loader and the server's
    adapter = out / "adapter"
    model, tokenizer, info = load_for_evaluation(str(task.base), None, None, "cpu", None, str(adapter))
    assert generate_text(model, tokenizer, "abch", "greedy", 5) == "abchbcda"
    assert info["adapter"] == str(adapter.resolve())
    served = argparse.Namespace(
        model=str(task.base),
        tokenizer=None,
        device="cpu",
        dtype=None,
        quantized=None,
        group_size=None,
        adapter=str(adapter),
    )
    model, tokenizer = load_for_serving(served)
    assert generate_text(model, tokenizer, "abch", "greedy", 5) == "abchbcda"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "abcd"}', "the field 'target' is missing"),
        ('{"prompt": "abcd", "target": ""}', "the target is empty"),
        (
            '{"prompt": "' + "abcd" * 20 + '", "target": "a"}',
            "the record takes 83 tokens (prompt 81, <sop>, target 1), more than the sequence length 48",
        ),
    ],
)
def test_bad_data_is_one_line_naming_file_and_line(task, tmp_path, capsys, line, message):
    data = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "abcd", "target": "bcde"}', line])
    assert (
        main(
            [
                "finetune",
                "--model",
                str(task.base),
                "--data",
                str(data),
                "--method",
                "lora",
                "--out-dir",
                str(tmp_path / "out"),
                *train_flags(),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"glm130b: {data}:2: ") and message in err
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_a_prefix_cannot_be_merged(task, tmp_path, capsys):
    adapter = save_adapter(add_prefix(freeze(load_model(task.base)), 4), tmp_path / "prefix")
    assert (
        main(["merge-adapter", "--model", str(task.base), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
    )
    assert "is a P-tuning v2 prefix" in capsys.readouterr().err
