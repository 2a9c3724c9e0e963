"""Adapter folders: what a LoRA or P-tuning v2 fine-tune writes, and a base model with one loaded.

A folder holds `glm130b_adapter.json` (the method, the base model's config, the quantization the
adapter was trained over) and the method's tensors: PEFT's adapter_config.json and
adapter_model.safetensors for LoRA (PeftModel.from_pretrained reads them too), prefix.safetensors
for P-tuning v2. `load_model_with_adapter` is the one loader for generate, serve and evaluate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glm130b.adapters.lora import has_lora, load_lora, merge_lora, save_lora
from glm130b.adapters.prefix import add_prefix, prefix_length, prefix_state
from glm130b.checkpoint.model_dir import load_model, save_model
from glm130b.core.atomic import atomic_path
from glm130b.core.config_io import read_mapping, write_mapping
from glm130b.core.errors import CheckpointError, ConfigError, GLMError
from glm130b.model.config import GLMConfig
from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, dequantize_model, quantize_model
from glm130b.tokenizer.tokenizers import load_tokenizer

ADAPTER_FILE = "glm130b_adapter.json"
PREFIX_FILE = "prefix.safetensors"
METHODS = ("lora", "ptuning")
# GLMConfig fields an adapter depends on: the shapes of what it adds to, and the positions and FFN
# that its training saw. Dropout and the attention backend may differ between training and use.
BASE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "inner_hidden_size",
    "position_encoding",
    "ffn",
    "tie_word_embeddings",
)
TOKENIZER_DIR = "tokenizer"  # a model directory's tokenizer folder (as glm130b pretrain writes it)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantization_of(model: nn.Module) -> QuantScheme | None:
    """The scheme of the model's quantized linears, None for a floating-point model."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)), None)


def adapter_method(model: nn.Module) -> str | None:
    """ "lora" or "ptuning" for a model carrying that adapter, None for a plain one."""
    if has_lora(model):
        return "lora"
    return "ptuning" if prefix_length(model) is not None else None


def save_adapter(model: GLM, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter `model` carries (LoRA or prefix) with its record; returns the folder.
    `state`: the model's whole state dict when the model is sharded (gathered by the caller)."""
    directory = Path(directory)
    method = adapter_method(model)
    if method is None:
        raise GLMError("the model carries no adapter to save: add LoRA or a prefix first (glm130b.adapters)")
    directory.mkdir(parents=True, exist_ok=True)
    scheme = quantization_of(model)
    record = {
        "method": method,
        "base_config": model.config.to_dict(),
        "quantization": None if scheme is None else {"bits": scheme.bits, "group_size": scheme.group_size},
    }
    if method == "lora":
        save_lora(model, directory, state)
    else:
        record["prefix_length"] = prefix_length(model)
        with atomic_path(directory / PREFIX_FILE) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in prefix_state(model, state).items()}, str(tmp))
    write_mapping(directory / ADAPTER_FILE, record)  # last: a folder with its record is complete
    return directory


def read_adapter_record(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / ADAPTER_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not an adapter folder: {ADAPTER_FILE} is missing "
            "(glm130b finetune --method lora|ptuning writes one)"
        )
    record = read_mapping(directory / ADAPTER_FILE, "adapter record")
    if record.get("method") not in METHODS:
        raise CheckpointError(
            f"{directory / ADAPTER_FILE}: method must be one of {', '.join(METHODS)}, got {record.get('method')!r}"
        )
    return record


def recorded_quantization(record: dict) -> QuantScheme | None:
    q = record.get("quantization")
    return None if q is None else QuantScheme(q["bits"], q["group_size"])


def attach_adapter(model: GLM, directory: str | Path) -> GLM:
    """Freeze `model` and load the adapter of `directory` onto it (in place)."""
    directory = Path(directory)
    record = read_adapter_record(directory)
    try:
        base = GLMConfig.from_dict(record["base_config"])
    except (KeyError, ConfigError) as err:
        raise CheckpointError(f"{directory / ADAPTER_FILE} has no readable base_config ({err})") from None
    for name in BASE_FIELDS:
        if getattr(base, name) != getattr(model.config, name):
            raise CheckpointError(
                f"the adapter in {directory} was trained on a model with {name} "
                f"{getattr(base, name)!r}, this one has {getattr(model.config, name)!r}; "
                "load it onto its own base model"
            )
    freeze(model)
    if record["method"] == "lora":
        return load_lora(model, directory)
    add_prefix(model, record["prefix_length"])
    device = model.transformer.word_embeddings.weight.device
    state = load_file(str(directory / PREFIX_FILE), str(device))
    if set(state) != set(prefix_state(model)):
        raise CheckpointError(f"{directory / PREFIX_FILE} does not hold one prefix per layer of this model")
    model.load_state_dict(state, strict=False)
    return model


def load_model_with_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    scheme: QuantScheme | None = None,
) -> GLM:
    """The base model of `model_dir` (glm130b.checkpoint.load_model) with the adapter of
    `adapter_dir` loaded, in eval mode: what `glm130b generate --adapter`, serving and evaluation
    run. A floating-point model directory is quantized on load with `scheme`, by default the one
    the adapter was trained over (if any); a quantized directory is used as it is."""
    scheme = scheme or recorded_quantization(read_adapter_record(adapter_dir))
    model = load_model(model_dir, device=device, dtype=dtype)
    if scheme is not None and quantization_of(model) is None:
        quantize_model(model, scheme)
    return attach_adapter(model, adapter_dir).eval()


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A model directory with a LoRA adapter folded into the weights (floating point, the dtype of
    `model_dir`; a quantized base is dequantized), and the base's tokenizer folder when it has one."""
    if read_adapter_record(adapter_dir)["method"] != "lora":
        raise GLMError(
            f"{adapter_dir} is a P-tuning v2 prefix: extra keys and values, not a change of weights, "
            "so it cannot be merged; load it with --adapter instead"
        )
    model = load_model_with_adapter(model_dir, adapter_dir)
    model = merge_lora(dequantize_model(model, model.transformer.word_embeddings.weight.dtype))
    out_dir = save_model(model, out_dir, metadata={"merged_adapter": str(adapter_dir)})
    if (Path(model_dir) / TOKENIZER_DIR).is_dir():
        load_tokenizer(Path(model_dir) / TOKENIZER_DIR).save(out_dir / TOKENIZER_DIR)
    return out_dir
