"""A model directory and its tokenizer, loaded for inference the one way every command does it: the
tokenizer checked against the model, the checkpoint's dtype kept on CUDA, optional quantization."""

from __future__ import annotations

from pathlib import Path

import torch

from glm130b.adapters.folder import load_model_with_adapter
from glm130b.checkpoint.model_dir import load_model, weights_metadata
from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import InputError
from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, quantize_model
from glm130b.tokenizer.tokenizers import Tokenizer, load_tokenizer


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(requested: str | None, device: torch.device) -> torch.dtype | None:
    """`requested`, else the checkpoint's own on CUDA (None: load_model keeps the stored dtype; fp16
    for the GLM-130B release, the dtype it was trained and evaluated in), else fp32 on CPU (where fp16
    and bf16 matmuls are slow)."""
    if requested is not None:
        return DTYPES[requested]
    return None if device.type == "cuda" else torch.float32


def load_tokenizer_for(model_dir: Path, tokenizer_dir: str | Path | None) -> Tokenizer:
    """The tokenizer of `model_dir` (its `tokenizer/` folder unless another is given), refused when
    the weights record a different tokenizer or it has more ids than the model has rows."""
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir / "tokenizer"
    if not tokenizer_dir.exists():
        raise InputError(
            f"no tokenizer at {tokenizer_dir}: pass --tokenizer DIR (a folder written by "
            "glm130b's tokenizer, or one holding ice_text.model)"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    trained_with = weights_metadata(model_dir).get("tokenizer_fingerprint")
    if trained_with is not None and trained_with != tokenizer.fingerprint():
        raise InputError(
            f"{tokenizer_dir} is not the tokenizer {model_dir} was trained with (its fingerprint "
            f"differs); pass the model's own tokenizer folder with --tokenizer"
        )
    return tokenizer


def load_for_inference(
    model_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    adapter: str | Path | None = None,
) -> tuple[GLM, Tokenizer]:
    """(model in eval mode, tokenizer) of a model directory; `bits` quantizes a floating-point model
    on load (a directory written by `glm130b quantize` is quantized already). `adapter`: a LoRA or
    P-tuning v2 folder of `glm130b finetune` loaded onto it (the base quantized as the adapter was
    trained over unless `bits` says otherwise): one loader for generate, serve and evaluate."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(
            f"{model_dir} is not a directory: give a model directory "
            "(config.json + model.safetensors, as written by glm130b)"
        )
    tokenizer = load_tokenizer_for(model_dir, tokenizer_dir)
    torch_device = resolve_device(device)
    if adapter is not None:
        scheme = QuantScheme(bits, group_size) if bits is not None else None
        model = load_model_with_adapter(model_dir, adapter, torch_device, default_dtype(dtype, torch_device), scheme)
    else:
        model = load_model(model_dir, device=torch_device, dtype=default_dtype(dtype, torch_device))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size} "
            "rows: they do not belong together; pass the model's own --tokenizer"
        )
    if bits is not None and not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        model = quantize_model(model, QuantScheme(bits, group_size))
    return model.eval(), tokenizer
