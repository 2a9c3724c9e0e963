"""Logits of glm130b.GLM against the official implementations' outputs (tests/fixtures)."""

import pytest
import torch

from glm130b import GLM
from tests.helpers import load_fixture, oracle_config, oracle_model, valid_lengths

FP32_CASES = ["sat_basic_fp32", "sat_padded_fp32", "sat04_glm130b_2d_fp32", "chatglm6b_stock_fp32"]
BACKENDS = ["reference", "sdpa"]


def max_error_on_valid_positions(logits, fixture):
    lengths = valid_lengths(fixture)
    return max((logits[b, :n].float() - fixture["logits"][b, :n].float()).abs().max().item()
               for b, n in enumerate(lengths.tolist()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_logits_match_reference(case, backend):
    fixture = load_fixture(case)
    model = oracle_model(case, attention_backend=backend)
    with torch.no_grad():
        logits = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    assert logits.shape == fixture["logits"].shape
    assert max_error_on_valid_positions(logits, fixture) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_logits_match_reference(backend):
    # Tolerance: the logits reach |65|, where fp16 values are spaced 2^-4 = 0.0625 apart; two fp16
    # implementations that round differently anywhere in 2 layers differ by up to that one step.
    fixture = load_fixture("sat_basic_fp16")
    model = oracle_model("sat_basic_fp16", attention_backend=backend).half()
    with torch.no_grad():
        logits = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    assert logits.dtype == torch.float16
    assert max_error_on_valid_positions(logits, fixture) <= 0.0625


def test_fp16_rotary_tables_matter():
    """The 0.2.12 reference rounds its rotary tables to fp16; fp32 tables miss it by far more than 1e-4."""
    fixture = load_fixture("sat_basic_fp32")
    model = oracle_model("sat_basic_fp32", rotary_dtype="fp32")
    with torch.no_grad():
        logits = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    assert max_error_on_valid_positions(logits, fixture) > 1e-3


def capture_layer_io(model):
    inputs, outputs = [], []

    def hook(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    for layer in model.transformer.layers:
        layer.register_forward_hook(hook)
    model.transformer.final_layernorm.register_forward_hook(hook)
    return inputs, outputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_layer_outputs_2d_rotary(backend):
    fixture = load_fixture("sat04_glm130b_2d_fp32")  # entry i = output of layer i, [seq, batch, hidden]
    model = oracle_model("sat04_glm130b_2d_fp32", attention_backend=backend)
    _, outputs = capture_layer_io(model)
    with torch.no_grad():
        model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    for i, expected in enumerate(fixture["layer_outputs"]):
        torch.testing.assert_close(outputs[i], expected.transpose(0, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_layer_outputs_chatglm(backend):
    # entry i = input to layer i; the last = output of the final LayerNorm
    fixture = load_fixture("chatglm6b_stock_fp32")
    model = oracle_model("chatglm6b_stock_fp32", attention_backend=backend)
    inputs, outputs = capture_layer_io(model)
    with torch.no_grad():
        model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    *layer_inputs, final = fixture["layer_outputs"]
    for i, expected in enumerate(layer_inputs):
        torch.testing.assert_close(inputs[i], expected.transpose(0, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs[-1], final.transpose(0, 1), atol=1e-4, rtol=0)


def test_chatglm_alpha_quirk_is_needed():
    """ChatGLM-6B's code uses alpha = sqrt(2*28) at any depth; the true depth gives other logits."""
    fixture = load_fixture("chatglm6b_stock_fp32")
    model = oracle_model("chatglm6b_stock_fp32", deepnorm_num_layers=None)
    with torch.no_grad():
        logits = model(fixture["input_ids"], fixture["position_ids"], fixture["attention_mask"])
    assert max_error_on_valid_positions(logits, fixture) > 1e-2


def test_official_state_dict_loads_without_renaming():
    fixture = load_fixture("sat04_glm130b_2d_fp32")  # carries a mixins...rotary_emb.inv_freq buffer
    model = oracle_model("sat04_glm130b_2d_fp32")
    own = model.state_dict()
    expected = {k for k in fixture["state_dict"] if not k.endswith("rotary_emb.inv_freq")}
    assert set(own) == expected


def test_missing_key_is_an_error():
    fixture = load_fixture("sat_basic_fp32")
    state = dict(fixture["state_dict"])
    del state["transformer.layers.1.mlp.dense_h_to_4h.weight"]
    with pytest.raises(RuntimeError, match="transformer.layers.1.mlp.dense_h_to_4h.weight"):
        GLM(oracle_config("sat_basic_fp32")).load_state_dict(state)
