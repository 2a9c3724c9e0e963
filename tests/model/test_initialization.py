"""GLM-130B initialisation: the DeepNorm gain lands on the rows the attention uses as values."""

import math

import torch
import torch.nn.functional as F

import glm130b.model.glm as model_module
from glm130b import GLM, GLMConfig
from glm130b.model.initialization import initialize_glm

CONFIG = GLMConfig(
    num_layers=3, hidden_size=256, num_attention_heads=4, vocab_size=512, inner_hidden_size=384, max_sequence_length=16
)
BETA = (2 * 3) ** -0.5


def value_rows_seen_by_attention(model: GLM, monkeypatch) -> torch.Tensor:
    """Which rows of layer 0's qkv weight become the attention's values, found by running the
    forward with the bias set to the row number (weights zero) and reading what reaches SDPA."""
    attention = model.transformer.layers[0].attention
    seen, sdpa = {}, F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.setdefault("v", v)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        attention.query_key_value.weight.zero_()
        attention.query_key_value.bias.copy_(torch.arange(3 * CONFIG.hidden_size, dtype=torch.float32))
        attention(
            torch.zeros(1, 2, CONFIG.hidden_size),
            model_module.RotaryAngles.build(torch.zeros(1, 2, dtype=torch.long), CONFIG),
            torch.zeros(1, 1, 2, 2, dtype=torch.bool),
            None,
            0,
        )
    return seen["v"][0, :, 0, :].flatten().long()  # [H * D] row numbers, head by head


def test_deepnorm_gain_is_on_the_value_rows_of_every_head(monkeypatch):
    model = initialize_glm(GLM(CONFIG), seed=0)
    weight = model.transformer.layers[0].attention.query_key_value.weight.detach().clone()
    value_rows = value_rows_seen_by_attention(GLM(CONFIG), monkeypatch)
    assert len(set(value_rows.tolist())) == CONFIG.hidden_size
    other_rows = torch.tensor(sorted(set(range(3 * CONFIG.hidden_size)) - set(value_rows.tolist())))
    xavier = math.sqrt(2 / (CONFIG.hidden_size + CONFIG.hidden_size))  # each of q, k, v is h -> h
    assert abs(weight[value_rows].std().item() / (BETA * xavier) - 1) < 0.03
    assert abs(weight[other_rows].std().item() / xavier - 1) < 0.03
    # the official code's rows 2h..3h are not the value rows in the per-head layout
    assert not set(range(2 * CONFIG.hidden_size, 3 * CONFIG.hidden_size)) <= set(value_rows.tolist())


def test_other_parameters_follow_the_recipe():
    model = initialize_glm(GLM(CONFIG), seed=0)
    h, f = CONFIG.hidden_size, CONFIG.inner_hidden_size

    def ratio(tensor, expected_std):
        return tensor.std().item() / expected_std

    emb = model.transformer.word_embeddings.weight
    assert abs(ratio(emb, math.sqrt(1 / (3 * h))) - 1) < 0.03  # = 0.0052 at h = 12288
    for layer in model.transformer.layers:
        assert abs(ratio(layer.attention.dense.weight, BETA * math.sqrt(2 / (2 * h))) - 1) < 0.03
        value_half, gate_half = layer.mlp.dense_h_to_4h.weight.chunk(2)
        for half in (value_half, gate_half):
            assert abs(ratio(half, BETA * math.sqrt(2 / (h + f))) - 1) < 0.03
        assert abs(ratio(layer.mlp.dense_4h_to_h.weight, BETA * math.sqrt(2 / (h + f))) - 1) < 0.03
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name:
            assert torch.all(p == 1), name
    assert abs(emb.mean().item()) < 1e-3


def test_seeded_initialisation_is_reproducible():
    a = initialize_glm(GLM(CONFIG), seed=7).state_dict()
    b = initialize_glm(GLM(CONFIG), seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
