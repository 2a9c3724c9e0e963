"""The glm130b command line as a user meets it: info, tokenizer files, device errors, Ctrl-C, pipes,
warnings."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from glm130b.checkpoint.model_dir import save_model
from glm130b.cli.commands import main
from glm130b.tokenizer.tokenizers import train_tokenizer
from tests.helpers import oracle_model


def test_info_reports_glm130b_size(capsys):
    assert main(["info", "--preset", "glm-130b"]) == 0
    assert "parameters: 128,697,794,560" in capsys.readouterr().out


def test_info_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhidden_size: 60\nnum_attention_heads: 7\nvocab_size: 10\n")
    assert main(["info", "--config", str(bad)]) == 2
    assert "num_attention_heads (7) must divide hidden_size (60)" in capsys.readouterr().err


TEXT = "the quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。" * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    save_model(oracle_model("sat_basic_fp32"), folder)
    train_tokenizer([TEXT], folder / "tokenizer", vocab_size=308)  # ids below the model's 1000
    return folder


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "glm130b.cli", *args], capture_output=True, text=True, **kwargs)


def test_info_describes_a_model_directory_and_asks_when_given_nothing(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    parameters = sum(p.numel() for p in oracle_model("sat_basic_fp32").parameters())
    assert f"parameters: {parameters:,}" in out and "safetensors file(s)" in out and str(model_dir / "tokenizer") in out
    assert main(["info"]) == 2
    assert "say which model" in capsys.readouterr().err
    assert main(["info", str(model_dir / "tokenizer")]) == 2
    assert "is not a model directory" in capsys.readouterr().err


def test_a_tokenizer_model_file_is_read_as_its_folder_says(model_dir, capsys):
    assert main(["tokenizer", "encode", str(model_dir / "tokenizer"), "hello"]) == 0
    by_folder = capsys.readouterr().out
    assert main(["tokenizer", "encode", str(model_dir / "tokenizer" / "tokenizer.model"), "hello"]) == 0
    assert capsys.readouterr().out == by_folder  # not icetk's ids offset by 20000
    stray = model_dir.parent / "stray.model"
    stray.write_bytes((model_dir / "tokenizer" / "tokenizer.model").read_bytes())
    assert main(["tokenizer", "encode", str(stray), "hello"]) == 2
    assert "without the tokenizer.json that says which tokenizer" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(model_dir, capsys):
    assert main(["generate", "--checkpoint", str(model_dir), "--device", "cuda", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--device cpu" in err


def test_output_piped_into_head_ends_quietly(model_dir):
    ids = subprocess.Popen(
        [sys.executable, "-m", "glm130b.cli", "tokenizer", "encode", str(model_dir / "tokenizer"), TEXT * 40],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = ids.stdout.read(10)  # then close the pipe, as `head -c 10` does
    ids.stdout.close()
    assert ids.wait(timeout=120) == 0 and first
    assert ids.stderr.read() == b""


def test_ctrl_c_is_one_line_and_no_traceback(model_dir):
    session = subprocess.Popen(
        [sys.executable, "-m", "glm130b.cli", "generate", "--checkpoint", str(model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a pytest-xdist worker may ignore SIGINT, and a child inherits that: Python then installs
        # no KeyboardInterrupt handler and the session never sees Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120  # a bound on waiting for the prompt, not a timed assertion
    banner = ""
    while "type a prompt" not in banner and time.monotonic() < deadline:
        banner += session.stderr.readline()
    session.send_signal(signal.SIGINT)
    session.wait(timeout=60)  # before communicate() closes stdin: the session must end by the signal, not EOF
    out, err = session.communicate(timeout=60)
    assert session.returncode == 130
    assert "Traceback" not in err and err.strip().endswith("run the same command again to resume")


def test_warnings_print_as_one_line():
    run = run_cli(
        "pretrain",
        "--activation_checkpointing",
        "true",
        "--model_preset",
        "glm-tiny",
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert run.returncode == 2
    warning = [line for line in run.stderr.splitlines() if "deprecated" in line]
    assert warning and warning[0].startswith("glm130b: warning: ") and ".py:" not in run.stderr


def test_several_prompts_print_one_json_line_each(model_dir):
    run = run_cli(
        "generate", "--checkpoint", str(model_dir), "--max-new-tokens", "4", "--json", "the [MASK] fox", "lazy dog"
    )
    assert run.returncode == 0, run.stderr
    lines = [__import__("json").loads(line) for line in run.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == ["the [MASK] fox", "lazy dog"]
    assert all(len(line["blanks"]) == 1 and line["text"] for line in lines)


def test_a_tokenizer_other_than_the_models_is_refused(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    trained = tmp_path / "trained"
    save_model(oracle_model("sat_basic_fp32"), trained)
    weights = trained / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "glm130b", "tokenizer_fingerprint": "abc"})
    other = run_cli("generate", "--checkpoint", str(trained), "--tokenizer", str(model_dir / "tokenizer"), "hi")
    assert other.returncode == 2 and "is not the tokenizer" in other.stderr and "Traceback" not in other.stderr
