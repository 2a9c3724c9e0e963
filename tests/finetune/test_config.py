"""FinetuneConfig: the fine-tuning defaults over the pretraining recipe, what overrides them, and
the combinations it refuses."""

import pytest

from glm130b import GLMConfig
from glm130b.core.errors import ConfigError
from glm130b.finetune.config import FINETUNE_DEFAULTS, FinetuneConfig

BASE = GLMConfig.from_preset("glm-tiny")


def test_method_defaults_and_overrides():
    lora = FinetuneConfig(model="m", data="d", method="lora").train_config(BASE, num_sequences=100)
    full = FinetuneConfig(model="m", data="d", method="full").train_config(BASE, num_sequences=100)
    ptuning = FinetuneConfig(model="m", data="d", method="ptuning").train_config(BASE, num_sequences=100)
    assert (lora.lr, full.lr, ptuning.lr) == (2e-4, 8e-6, 2e-2)
    assert lora.weight_decay == 0.0 and full.weight_decay == 0.1
    assert lora.rampup_start_batch_size is None and lora.embedding_grad_scale == 1.0
    assert lora.model_config() == BASE  # the base's own config, whatever the preset says
    assert lora.sequence_length == BASE.max_sequence_length == 128  # packing fills the context
    assert lora.precision == "fp32"  # no CUDA here; bf16 on a GPU
    # 3 epochs of 100 sequences in batches of 8: 38 steps
    assert lora.train_samples == 38 * FINETUNE_DEFAULTS["global_batch_size"]

    tuned = FinetuneConfig(
        model="m", data="d", epochs=1, train={"lr": 1e-3, "spike_guard": {"window": 30}, "global_batch_size": 4}
    ).train_config(BASE, 10)
    assert tuned.lr == 1e-3 and tuned.train_samples == 12
    assert tuned.spike_guard.window == 30 and tuned.spike_guard.loss_ratio == 3.0  # sections merge by field


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "prompt"}, "method must be one of full, lora, ptuning"),
        ({"method": "full", "quantized": "int4"}, "a quantized weight cannot train"),
        ({"quantized": "int3"}, "quantized must be one of int4, int8"),
        ({"method": "ptuning", "merge": True}, "prefixes, which are extra keys and values"),
        ({"lora_targets": ["q_proj"]}, "lora_targets must be a non-empty list of query_key_value"),
        ({"epochs": 0}, "epochs must be a positive number"),
        ({"train": {"lr": -1}}, "lr must be a positive number"),
    ],
)
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FinetuneConfig.from_dict({"model": "m", "data": "d", **fields}).train_config(BASE, 10)


def test_lora_targets_from_the_command_line_spelling():
    config = FinetuneConfig.from_dict({"lora_targets": "query_key_value, dense_4h_to_h"})
    assert config.lora_targets == ["query_key_value", "dense_4h_to_h"]
