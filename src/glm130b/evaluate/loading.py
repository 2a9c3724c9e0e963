"""The model and tokenizer an evaluation runs on, shared by `glm130b evaluate` and the
lm-evaluation-harness adapter: glm130b.generate.loading's one loader, on this rank's device, plus the
record of what was evaluated."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glm130b.core.dtypes import DTYPES
from glm130b.generate.loading import load_for_inference
from glm130b.quant.linear import QuantizedLinear

QUANTIZED = {"int8": 8, "int4": 4}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # torch.float32 -> "fp32"


def load_for_evaluation(
    model_dir: str,
    quantized: str | None,
    tokenizer_dir: str | None,
    device: str | None,
    dtype: str | None,
    adapter: str | None = None,
):
    """Model (quantized on load when asked, unless its directory already is; with a fine-tuned
    adapter loaded onto it when given), tokenizer, and the record of both for the results file."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # under torchrun each rank takes its own GPU
    device = device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    stored_quantized = None
    model, tokenizer = load_for_inference(
        model_dir, tokenizer_dir, device, dtype, QUANTIZED[quantized] if quantized else None, adapter=adapter
    )
    if not quantized and any(isinstance(m, QuantizedLinear) for m in model.modules()):
        stored_quantized = "stored quantized"
    info = {
        "path": str(Path(model_dir).resolve()),
        "config": model.config.to_dict(),
        "dtype": DTYPE_NAMES[model.transformer.word_embeddings.weight.dtype],
        "device": torch.device(device).type,
        "quantization": quantized or stored_quantized,
        "tokenizer": tokenizer.fingerprint(),
        "adapter": str(Path(adapter).resolve()) if adapter else None,
    }
    return model.eval(), tokenizer, info
