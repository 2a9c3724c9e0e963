"""The glm130b command line."""

from glm130b.cli.main import main


def test_info_reports_glm130b_size(capsys):
    assert main(["info", "--preset", "glm-130b"]) == 0
    assert "parameters: 128,697,794,560" in capsys.readouterr().out


def test_info_bad_config_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhidden_size: 60\nnum_attention_heads: 7\nvocab_size: 10\n")
    assert main(["info", "--config", str(bad)]) == 2
    assert "num_attention_heads (7) must divide hidden_size (60)" in capsys.readouterr().err
