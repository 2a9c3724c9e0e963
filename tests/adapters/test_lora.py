"""LoRA through PEFT on our modules (glm130b.adapters.lora): PEFT's own layers wrap the chosen
linears in place and start as the identity, gradients reach every adapter through a frozen
quantized base as through its dequantized weights, and merging gives the adapter's logits."""

import pytest
import torch

from glm130b.adapters.folder import freeze
from glm130b.adapters.lora import LORA_TARGETS, add_lora, has_lora, lora_config, merge_lora
from glm130b.core.errors import ConfigError
from glm130b.generate.inputs import build_generation_batch
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, dequantize_model, quantize_model
from tests.generate.helpers import TOK, tiny_glm

peft = pytest.importorskip("peft")


def batch():
    return build_generation_batch([[7, 8, 9, TOK.gmask, TOK.sop, 10, 11], [12, TOK.mask, 13, TOK.eos, TOK.sop]], TOK)


def forward(model, b=None):
    b = b or batch()
    return model(b.input_ids, b.position_ids, b.attention_mask)


def randomize_adapters(model, seed=0):
    """LoRA starts with B = 0; give every adapter weight a value so that all of them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_peft_layers_wrap_the_chosen_linears_and_start_as_the_identity():
    model = tiny_glm(embedding_std=0.3).eval()
    before = forward(model)
    add_lora(freeze(model), lora_config(rank=4, targets=list(LORA_TARGETS), dropout=0.0))
    assert has_lora(model)
    block = model.transformer.layers[0]
    for module in (
        block.attention.query_key_value,
        block.attention.dense,
        block.mlp.dense_h_to_4h,
        block.mlp.dense_4h_to_h,
    ):
        assert isinstance(module, peft.tuners.lora.Linear) and isinstance(module.base_layer, torch.nn.Linear)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == set(
        LORA_TARGETS
    )
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(forward(model), before, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="lora_targets must be some of"):
        lora_config(targets=["q_proj"])


@pytest.mark.parametrize("scheme", [QuantScheme(4), QuantScheme(8, 32)], ids=lambda s: s.name)
def test_gradients_through_a_frozen_quantized_base_equal_the_dequantized_ones(scheme):
    quantized = quantize_model(tiny_glm(embedding_std=0.3), scheme)
    packed = {n: b.clone() for n, b in quantized.named_buffers()}
    config = dict(rank=4, targets=["query_key_value", "dense_4h_to_h"], dropout=0.0)
    add_lora(freeze(quantized), lora_config(**config))
    assert isinstance(quantized.transformer.layers[0].attention.query_key_value.base_layer, QuantizedLinear)
    randomize_adapters(quantized)
    reference = randomize_adapters(
        add_lora(freeze(dequantize_model(quantize_model(tiny_glm(embedding_std=0.3), scheme))), lora_config(**config))
    )
    for model in (quantized, reference):
        forward(model).square().mean().backward()
    grads = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())  # layer 0 too
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(b, packed[n.replace("base_layer.", "")]) for n, b in quantized.named_buffers())


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_weights_give_the_adapter_logits(quantized):
    model = tiny_glm(embedding_std=0.3).eval()
    if quantized:
        quantize_model(model, QuantScheme(4))
    randomize_adapters(add_lora(freeze(model), lora_config(rank=4, targets=list(LORA_TARGETS), dropout=0.0)))
    adapted = forward(model)
    if quantized:
        with pytest.raises(Exception, match="dequantize the model before merging"):
            merge_lora(model)
        dequantize_model(model)
    merge_lora(model)
    assert not has_lora(model) and not any("lora_" in n for n, _ in model.named_parameters())
    assert isinstance(model.transformer.layers[1].mlp.dense_4h_to_h, torch.nn.Linear)
    torch.testing.assert_close(forward(model), adapted, rtol=1e-5, atol=1e-5)
