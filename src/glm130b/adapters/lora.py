"""LoRA on a GLM through PEFT: PEFT injects its own LoRA layers into our linear modules in place
(the model stays a GLM, so training, generation and checkpoints see the same class), saves and
loads adapters in its own format (`PeftModel.from_pretrained` reads our folders), and merges them.

Over a quantized base, PEFT's LoRA layer wraps our QuantizedLinear: it only calls the base layer
and adds B A x, and the base's product is differentiable in its input (glm130b.quant.kernels), so
the packed weights stay packed while the adapters train.

peft is imported where it is used: it pulls in transformers (seconds), which `glm130b generate`
without an adapter should not pay, and it is an optional dependency (the `finetune` extra).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glm130b.core.atomic import atomic_path
from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import CheckpointError, ConfigError, GLMError
from glm130b.quant.linear import QuantizedLinear

LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter
# PEFT's file names and key prefix (what PeftModel.save_pretrained writes), so PEFT reads our folders.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."


def _peft():
    try:
        import peft
    except ImportError:
        raise GLMError("LoRA needs the peft package: pip install 'glm130b[finetune]'") from None
    return peft


def lora_config(
    rank: int = 8, alpha: float = 16.0, dropout: float = 0.05, targets: Sequence[str] = ("query_key_value",)
):
    """A peft.LoraConfig on our module names; targets from LORA_TARGETS (`dense` is the attention
    output, `dense_h_to_4h` / `dense_4h_to_h` the FFN's input and output)."""
    check_positive_int("lora_rank", rank)
    check_field("lora_alpha", alpha, float, lambda v: v > 0, "a positive number")
    check_field("lora_dropout", dropout, float, lambda v: 0 <= v < 1, "in [0, 1)")
    targets = list(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise ConfigError(f"lora_targets must be some of {', '.join(LORA_TARGETS)}; got {targets}")
    return _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")


def add_lora(model: nn.Module, config) -> nn.Module:
    """Inject LoRA layers of `config` into `model` in place (fp32) and freeze everything but them."""
    peft = _peft()
    config._register_custom_module({QuantizedLinear: peft.tuners.lora.Linear})
    with warnings.catch_warnings():
        # PEFT warns on any layer class it does not know; QuantizedLinear has the in/out features
        # and the forward its Linear wrapper needs (tests/adapters check training and merging).
        warnings.filterwarnings("ignore", message="Unsupported layer type .*QuantizedLinear")
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # fp32 adapters over a half-precision base (PeftModel's default too): they are the trained copy
    peft.tuners.tuners_utils.cast_adapter_dtype(model, ADAPTER_NAME)
    return model


def has_lora(model: nn.Module) -> bool:
    return ADAPTER_NAME in (getattr(model, "peft_config", None) or {})


def save_lora(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT's adapter_config.json and adapter_model.safetensors of the injected adapter. `state`:
    the model's whole state dict when the model itself is sharded (gathered by the caller)."""
    peft = _peft()
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    state = peft.get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER_NAME)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(
            {PEFT_KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(tmp),
            metadata={"format": "pt"},
        )


def load_lora(model: nn.Module, directory: Path) -> nn.Module:
    """Inject the adapter saved in `directory` (save_lora or PeftModel.save_pretrained) and load its weights."""
    peft = _peft()
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{directory / CONFIG_FILE} cannot be read as a LoRA config ({err})") from None
    add_lora(model, config)
    device = next(p for n, p in model.named_parameters() if "lora_" in n).device
    state = {
        k.removeprefix(PEFT_KEY_PREFIX): v for k, v in load_file(str(directory / WEIGHTS_FILE), str(device)).items()
    }
    expected = set(peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    if set(state) != expected:
        wrong = sorted(set(state) ^ expected)
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not fit this model's LoRA layers "
            f"(first mismatch: {wrong[0]}); was it trained on another base model?"
        )
    peft.set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight with PEFT's merge and put the base layer back in
    its place (PEFT's merge_and_unload, for a model injected in place). The base layers must be
    floating point (glm130b.quant.linear.dequantize_model a quantized one first)."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        if isinstance(module.base_layer, QuantizedLinear):
            raise GLMError(f"{name} has a quantized base layer: dequantize the model before merging LoRA into it")
        module.merge(adapter_names=[ADAPTER_NAME])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    del model.peft_config
    return model
