"""GLMConfig: presets, defaults of the official class, validation, YAML/JSON round trip."""

import math

import pytest
import torch

from glm130b import GLM, GLMConfig
from glm130b.model.config import ConfigError

SHAPE = dict(
    num_layers=4, hidden_size=128, num_attention_heads=8, vocab_size=512, inner_hidden_size=344, max_sequence_length=256
)


def test_glm130b_preset_on_meta_device_has_the_published_parameter_count():
    with torch.device("meta"):
        model = GLM(GLMConfig.from_preset("glm-130b"))
    # SPEC section 1: 126.84 B in linear weights + 1.85 B embedding + biases and LayerNorms
    assert model.num_parameters() == 128_697_794_560
    assert model.transformer.layers[0].mlp.dense_h_to_4h.weight.shape == (65536, 12288)
    assert model.transformer.layers[0].attention.query_key_value.weight.shape == (36864, 12288)
    assert math.isclose(model.config.deepnorm_alpha, 11.832, abs_tol=1e-3)


def test_glm1b_preset_is_the_benchmarks_1_2b_shape_with_head_dim_128():
    with torch.device("meta"):
        model = GLM(GLMConfig.from_preset("glm-1b"))
    h, inner, vocab = 2048, 5504, 150528
    per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * 2 * inner + 2 * inner) + (inner * h + h) + 2 * 2 * h
    assert model.num_parameters() == 18 * per_layer + vocab * h + 2 * h == 1_219_503_616
    assert model.config.hidden_size // model.config.num_attention_heads == 128  # GLM-130B's head dimension
    assert model.config.inner_hidden_size % 128 == 0  # INT4 groups of 128 divide every input dimension


def test_defaults_are_the_official_glm130b_class():
    cfg = GLMConfig(**SHAPE)
    assert (cfg.position_encoding, cfg.rotary_dtype, cfg.ffn, cfg.tie_word_embeddings) == ("1d", "fp16", "geglu", True)
    assert cfg.deepnorm_alpha == math.sqrt(2 * 4)
    assert GLMConfig(**{**SHAPE, "inner_hidden_size": None}).inner_hidden_size == 4 * 128


def test_chatglm_preset_keeps_its_alpha_at_any_depth():
    cfg = GLMConfig.from_preset("chatglm-6b", num_layers=2, hidden_size=64, num_attention_heads=4)
    assert cfg.deepnorm_alpha == math.sqrt(2 * 28)
    assert (cfg.position_encoding, cfg.ffn, cfg.tie_word_embeddings) == ("2d", "gelu", False)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = GLMConfig(**SHAPE, position_encoding="2d", attention_backend="reference", hidden_dropout=0.0)
    path = tmp_path / f"model{suffix}"
    cfg.save(path)
    assert GLMConfig.load(path) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_attention_heads=7), r"num_attention_heads \(7\) must divide hidden_size \(128\)"),
        (dict(num_layers=0), "num_layers must be a positive integer, got 0"),
        (dict(ffn="swiglu"), "ffn must be one of geglu, gelu; got 'swiglu'"),
        (dict(attention_backend="flash"), "attention_backend must be one of sdpa, reference"),
        (dict(position_encoding="3d"), "position_encoding must be one of 1d, 2d"),
        (dict(hidden_dropout=1.5), r"hidden_dropout must be in \[0, 1\)"),
        (dict(hidden_size=120, num_attention_heads=8, position_encoding="2d"), "multiple of 4 for 2-D rotary"),
    ],
)
def test_validation_messages(change, message):
    with pytest.raises(ConfigError, match=message):
        GLMConfig(**{**SHAPE, **change})


def test_unknown_field_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown GLMConfig field"):
        GLMConfig.from_dict({**SHAPE, "num_heads": 8})
    with pytest.raises(ConfigError, match="missing required field.*hidden_size, num_attention_heads, vocab_size"):
        GLMConfig.from_dict({"num_layers": 3})
    with pytest.raises(ConfigError, match="unknown preset 'glm-7b'"):
        GLMConfig.from_preset("glm-7b")
    with pytest.raises(ConfigError, match="does not exist"):
        GLMConfig.load(tmp_path / "missing.yaml")
