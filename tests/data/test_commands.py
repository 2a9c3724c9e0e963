"""`glm130b data prepare` and `glm130b data info` (glm130b.data.commands)."""

from __future__ import annotations

from glm130b import cli
from tests.data.helpers import random_texts, write_jsonl


def test_cli_prepare_and_info(tmp_path, real_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in random_texts(10, 3)])
    source = f"name=a,lang=en,path={tmp_path / 'a.jsonl'}"
    argv = [
        "data",
        "prepare",
        "--source",
        source,
        "--tokenizer",
        str(real_tokenizer_dir),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
    ]
    assert cli.main(argv) == 0
    assert cli.main(["data", "info", str(tmp_path / "out")]) == 0
    assert "10 documents" in capsys.readouterr().out
    assert cli.main(["data", "info", str(tmp_path)]) == 2
    assert "not a prepared corpus" in capsys.readouterr().err
