"""The model and tokenizer an evaluation runs on, shared by `glm130b evaluate` and the
lm-evaluation-harness adapter: a model directory, quantized on load when asked."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glm130b.checkpoint.model_dir import load_model
from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import InputError
from glm130b.quant.format import QuantScheme
from glm130b.quant.linear import QuantizedLinear, quantize_model
from glm130b.tokenizer.tokenizers import load_tokenizer

QUANTIZED = {"int8": 8, "int4": 4}


def load_for_evaluation(model_dir: str, quantized: str | None, tokenizer_dir: str | None, device: str | None,
                        dtype: str | None):
    """Model (quantized on load when asked, unless its directory already is) and tokenizer."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    model_path = Path(model_dir)
    if not model_path.is_dir():
        raise InputError(f"--model {model_path} is not a directory: give a model directory (config.json + "
                         "model.safetensors)")
    tokenizer_path = Path(tokenizer_dir) if tokenizer_dir else model_path / "tokenizer"
    if not tokenizer_path.exists():
        raise InputError(f"no tokenizer at {tokenizer_path}: pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_path)
    dtype_name = dtype or ("bf16" if device.type == "cuda" else "fp32")
    model = load_model(model_path, device=device, dtype=DTYPES[dtype_name])
    already = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if quantized and not already:
        model = quantize_model(model, QuantScheme(QUANTIZED[quantized]))
    info = {"path": str(model_path.resolve()), "config": model.config.to_dict(), "dtype": dtype_name,
            "device": device.type, "quantization": quantized or ("stored quantized" if already else None),
            "tokenizer": tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else None}
    return model.eval(), tokenizer, info
