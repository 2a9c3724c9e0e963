"""Adapter folders (glm130b.adapters.folder): what is saved loads back onto the base with the same
logits, a folder remembers the quantization it was trained over, and a wrong base or folder is
refused with a message saying which."""

import pytest
import torch

from glm130b import GLMConfig
from glm130b.adapters.folder import (
    ADAPTER_FILE,
    attach_adapter,
    freeze,
    load_model_with_adapter,
    quantization_of,
    read_adapter_record,
    save_adapter,
)
from glm130b.adapters.lora import add_lora, lora_config
from glm130b.adapters.prefix import add_prefix
from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.core.errors import CheckpointError, GLMError
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, quantize_model
from tests.adapters.test_lora import forward, randomize_adapters
from tests.generate.helpers import tiny_glm

pytest.importorskip("peft")


def with_adapter(model, method):
    if method == "lora":
        return randomize_adapters(add_lora(freeze(model), lora_config(rank=2, targets=["dense", "dense_h_to_4h"])))
    add_prefix(freeze(model), 3, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(50)  # well away from a no-op
    return model


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_a_saved_adapter_loads_back_with_the_same_logits(tmp_path, method):
    save_model(tiny_glm(embedding_std=0.3), tmp_path / "base")
    model = with_adapter(load_model(tmp_path / "base"), method).eval()
    save_adapter(model, tmp_path / "adapter")
    assert read_adapter_record(tmp_path / "adapter")["method"] == method
    reloaded = load_model_with_adapter(tmp_path / "base", tmp_path / "adapter")
    assert not reloaded.training and not any(
        p.requires_grad for n, p in reloaded.named_parameters() if "lora_" not in n and ".prefix." not in n
    )
    torch.testing.assert_close(forward(reloaded), forward(model), rtol=0, atol=0)
    assert not torch.equal(forward(reloaded), forward(load_model(tmp_path / "base")))


def test_an_adapter_trained_over_a_quantized_base_gets_that_base(tmp_path):
    save_model(tiny_glm(embedding_std=0.3), tmp_path / "base")
    model = with_adapter(quantize_model(load_model(tmp_path / "base"), QuantScheme(4, 32)), "lora").eval()
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_model_with_adapter(tmp_path / "base", tmp_path / "adapter")  # a floating-point directory
    assert quantization_of(reloaded) == QuantScheme(4, 32)
    assert isinstance(reloaded.transformer.layers[0].attention.dense.base_layer, QuantizedLinear)
    torch.testing.assert_close(forward(reloaded), forward(model), rtol=0, atol=0)
    asked = load_model_with_adapter(tmp_path / "base", tmp_path / "adapter", scheme=QuantScheme(8))
    assert quantization_of(asked) == QuantScheme(8)


def test_wrong_bases_and_folders_are_refused(tmp_path):
    save_adapter(with_adapter(tiny_glm(), "ptuning"), tmp_path / "adapter")
    other = tiny_glm(vocab=16)
    other_shape = type(other)(GLMConfig(**{**other.config.to_dict(), "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="trained on a model with hidden_size 64, this one has 32"):
        attach_adapter(other_shape, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=f"not an adapter folder: {ADAPTER_FILE} is missing"):
        attach_adapter(tiny_glm(), tmp_path)
    with pytest.raises(GLMError, match="carries no adapter"):
        save_adapter(tiny_glm(), tmp_path / "nothing")
