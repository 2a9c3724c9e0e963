"""`glm130b generate` (glm130b.generate.commands): batches, beam search, the interactive session,
INT4 weights quantized on load."""

import io

import torch

from glm130b import cli
from glm130b.checkpoint.model_dir import save_model
from glm130b.cli import commands as cli_main
from glm130b.generate import loading
from tests.generate.helpers import LETTERS, CharTokenizer


def test_command_line(trained, tmp_path, monkeypatch, capsys):
    save_model(trained, tmp_path)
    (tmp_path / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: CharTokenizer())
    ckpt = ["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "8"]
    assert cli.main(ckpt + ["abc", "cd[MASK]g"]) == 0
    assert capsys.readouterr().out.splitlines() == ["abccba", "cdefg"]
    assert cli.main(ckpt + ["--strategy", "beam", "cab"]) == 0
    assert capsys.readouterr().out.strip() == "cabbac"
    monkeypatch.setattr("sys.stdin", io.StringIO("abc\nab[XMASK]\nab[MASK]e\n\n"))
    assert cli.main(ckpt) == 0
    captured = capsys.readouterr()
    assert captured.out.replace("> ", "").splitlines() == ["abccba", "abcde"]
    assert "unknown mask marker [XMASK]" in captured.err


def test_command_line_quantized(trained, tmp_path, monkeypatch, capsys):
    """--quantized swaps the linears for INT4 QuantizedLinear and still answers (the prompt's text
    comes back first; the tiny model's answer may change under INT4)."""
    save_model(trained, tmp_path)
    (tmp_path / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: CharTokenizer())
    assert (
        cli.main(
            ["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "4", "--quantized", "--no-stream", "abc"]
        )
        == 0
    )
    out = capsys.readouterr().out.strip()
    assert out.startswith("abc") and 3 < len(out) <= 7 and set(out) <= set(LETTERS)


def test_default_dtype_is_the_checkpoints_on_cuda(trained, tmp_path, monkeypatch, capsys):
    """No --dtype: on CUDA the weights keep the checkpoint's dtype (load_model(dtype=None); fp16 for
    the GLM-130B release), on CPU fp32; --dtype wins. load_model is replaced, so no GPU is needed."""
    (tmp_path / "tokenizer").mkdir()
    monkeypatch.setattr(loading, "load_tokenizer", lambda path: CharTokenizer())
    asked = []

    def fake_load_model(directory, device, dtype):
        asked.append((device.type, dtype))
        return trained

    monkeypatch.setattr(loading, "load_model", fake_load_model)
    # no GPU here: skip the command line's refusal of --device cuda (tests/cli/test_cli.py checks it)
    monkeypatch.setattr(cli_main, "check_device", lambda args: None)
    for extra in (["--device", "cuda"], ["--device", "cpu"], ["--device", "cuda", "--dtype", "bf16"]):
        assert cli.main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "2", *extra, "abc"]) == 0
    assert asked == [("cuda", None), ("cpu", torch.float32), ("cuda", torch.bfloat16)]
