"""Every command, fed the bad input a user will one day give it: a non-zero exit, one or two lines
on stderr naming the input, no traceback, and nothing left behind or changed."""

import json
import re
import shutil

import pytest

from glm130b.checkpoint.model_dir import save_model
from glm130b.cli.commands import main
from glm130b.tokenizer.tokenizers import train_tokenizer
from tests.helpers import FIXTURES, oracle_model

TEXT = "the quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs, made once: a good model directory, and each kind of bad file."""
    root = tmp_path_factory.mktemp("matrix")
    model = root / "model"
    save_model(oracle_model("sat_basic_fp32"), model)
    train_tokenizer([TEXT], model / "tokenizer", vocab_size=308)
    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    bad = {
        "model": model,
        "truncated": truncated,
        "latin1": root / "latin1.txt",  # ISO-8859-1 text: not UTF-8
        "bad_yaml": root / "bad.yaml",
        "bad_json": root / "bad.jsonl",
        "wrong_type": root / "wrong_type.json",
        "a_file": root / "a_file.txt",
        "folder": root / "folder",
        "prompts": root / "data.jsonl",
        "text": root / "text.txt",
    }
    official = root / "official-truncated"  # an official checkpoint with one shard cut short
    shutil.copytree(FIXTURES / "official_tp2_fp32", official)
    shard = official / "49300" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    bad["official_truncated"] = official
    import pyarrow as pa  # the `parquet` extra, installed for the tests
    import pyarrow.parquet as pq

    bad["parquet_truncated"] = root / "cut.parquet"
    pq.write_table(pa.table({"text": [TEXT] * 50}), bad["parquet_truncated"])
    cut = bad["parquet_truncated"].read_bytes()
    bad["parquet_truncated"].write_bytes(cut[: len(cut) // 2])
    bad["text"].write_text(TEXT)
    bad["latin1"].write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
    bad["bad_yaml"].write_text("lr: [1e-4\nmodel_preset: glm-tiny\n")
    bad["bad_json"].write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c", "target"\n')
    bad["wrong_type"].write_text(
        json.dumps({"num_layers": "two", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100})
    )
    bad["a_file"].write_text("not a directory\n")
    bad["folder"].mkdir()
    bad["prompts"].write_text("".join(json.dumps({"prompt": "the fox", "target": " jumps"}) + "\n" for _ in range(8)))
    return bad


# (case, argv with {placeholders} from `files` and {out}, a word the message must contain)
CASES = [
    ("pretrain config not UTF-8", ["pretrain", "--config", "{latin1}"], "latin1.txt"),
    ("pretrain config does not parse", ["pretrain", "--config", "{bad_yaml}"], "bad.yaml"),
    ("pretrain config is a folder", ["pretrain", "--config", "{folder}"], "folder"),
    ("pretrain bool as a word", ["pretrain", "--model_preset", "glm-tiny", "--resume", "maybe"], "resume"),
    ("plan config does not parse", ["plan", "--config", "{bad_yaml}", "--world-size", "1"], "bad.yaml"),
    ("plan config is a folder", ["plan", "--config", "{folder}", "--world-size", "1"], "folder"),
    ("info config of the wrong type", ["info", "--config", "{wrong_type}"], "num_layers"),
    ("info on a file", ["info", "{a_file}"], "a_file.txt"),
    ("info on a truncated model", ["info", "{truncated}"], "truncated"),
    ("generate from a file", ["generate", "--checkpoint", "{a_file}", "hi"], "a_file.txt"),
    ("generate from a truncated model", ["generate", "--checkpoint", "{truncated}", "hi"], "model.safetensors"),
    ("generate on cuda without one", ["generate", "--checkpoint", "{model}", "--device", "cuda", "hi"], "cuda"),
    ("quantize a truncated model", ["quantize", "--bits", "8", "{truncated}", "{out}"], "model.safetensors"),
    ("quantize into a file", ["quantize", "--bits", "8", "{model}", "{a_file}"], "a_file.txt"),
    ("convert a truncated model", ["convert", "{truncated}", "{out}"], "model.safetensors"),
    ("convert-official a truncated .pt shard", ["convert-official", "{official_truncated}", "{out}"], "mp_rank_00"),
    (
        "data prepare on a truncated parquet",
        [
            "data",
            "prepare",
            "--source",
            "name=x,lang=en,path={parquet_truncated}",
            "--tokenizer",
            "{model}/tokenizer",
            "--out",
            "{out}",
        ],
        "cut.parquet",
    ),
    ("tokenizer train into a file", ["tokenizer", "train", "--out", "{a_file}", "{text}"], "a_file.txt"),
    ("tokenizer train on non-UTF-8", ["tokenizer", "train", "--out", "{out}", "{latin1}"], "latin1.txt"),
    # /proc takes no new files, not even root's (a chmod'ed folder would not stop root)
    ("tokenizer train into a read-only place", ["tokenizer", "train", "--out", "/proc/glm130b-tok", "{text}"], "/proc"),
    ("quantize into a read-only place", ["quantize", "--bits", "8", "{model}", "/proc/glm130b-q"], "/proc"),
    (
        "data prepare into a read-only place",
        [
            "data",
            "prepare",
            "--source",
            "name=x,lang=en,path={text}",
            "--tokenizer",
            "{model}/tokenizer",
            "--out",
            "/proc/glm130b-c",
        ],
        "/proc",
    ),
    (
        "finetune into a read-only place",
        ["finetune", "--model", "{model}", "--data", "{prompts}", "--method", "lora", "--out-dir", "/proc/glm130b-ft"],
        "/proc",
    ),
    ("tokenizer encode with a folder of nothing", ["tokenizer", "encode", "{folder}", "hi"], "folder"),
    (
        "data prepare on non-UTF-8",
        [
            "data",
            "prepare",
            "--source",
            "name=x,lang=en,path={latin1}",
            "--tokenizer",
            "{model}/tokenizer",
            "--out",
            "{out}",
        ],
        "latin1.txt",
    ),
    (
        "finetune data that does not parse",
        ["finetune", "--model", "{model}", "--data", "{bad_json}", "--method", "lora", "--out-dir", "{out}"],
        "bad.jsonl",
    ),
    (
        "finetune from a truncated model",
        ["finetune", "--model", "{truncated}", "--data", "{prompts}", "--method", "lora", "--out-dir", "{out}"],
        "truncated",
    ),
    (
        "evaluate tasks from a folder without a task file",
        ["evaluate", "--model", "{model}", "--tasks", "{folder}", "--data-root", "{folder}"],
        "folder",
    ),
    (
        "merge an adapter that is not one",
        ["merge-adapter", "--model", "{model}", "--adapter", "{folder}", "--out", "{out}"],
        "folder",
    ),
]


@pytest.mark.parametrize("argv, named", [pytest.param(argv, named, id=case) for case, argv, named in CASES])
def test_bad_input_is_one_clear_line_and_leaves_nothing_behind(files, tmp_path, capsys, argv, named):
    out = tmp_path / "out"
    places = {**{k: str(v) for k, v in files.items()}, "out": str(out)}
    before = {p: p.stat().st_mtime_ns for p in files["model"].rglob("*")} | {files["a_file"]: 0}
    before[files["a_file"]] = files["a_file"].stat().st_mtime_ns

    code = main([part.format(**places) for part in argv])

    captured = capsys.readouterr()
    progress = re.compile(r"\d+%\||/s\]")  # tqdm's bars, which go to stderr
    lines = [
        line
        for line in captured.err.splitlines()
        if line.strip() and not line.startswith("glm130b: warning") and not progress.search(line)
    ]
    assert code != 0
    assert "Traceback" not in captured.err
    assert 1 <= len(lines) <= 2, captured.err
    assert named in captured.err, captured.err
    assert not out.exists()  # no output folder, not even an empty one
    assert {p: p.stat().st_mtime_ns for p in before} == before  # inputs untouched
