"""Model directories: save, load on the meta device, clear errors."""

import pytest
import torch

from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.core.errors import CheckpointError
from tests.helpers import load_fixture, oracle_model


def test_round_trip_gives_the_same_logits(tmp_path):
    fixture = load_fixture("chatglm6b_stock_fp32")  # untied head: two weight matrices to keep apart
    model = oracle_model("chatglm6b_stock_fp32")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    args = fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), fixture["logits"], atol=1e-4, rtol=0)


def test_load_in_half_precision(tmp_path):
    save_model(oracle_model("sat_basic_fp32"), tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)
    save_model(oracle_model("sat_basic_fp32"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds a config but no weights"):
        load_model(tmp_path / "m")
    save_model(oracle_model("sat_basic_fp32"), tmp_path / "other")
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    (tmp_path / "m" / "config.json").write_text(
        (tmp_path / "m" / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    )
    with pytest.raises(CheckpointError, match="weights in .* do not match config.json"):
        load_model(tmp_path / "m")
