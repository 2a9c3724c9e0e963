"""Quantized linear products: fused Triton kernels on CUDA, dequantize-by-tiles everywhere else.

`quantized_linear(x, weight, weight_scale, bias, scheme)` is the one entry point; QuantizedLinear
(glm130b.quant.linear) calls it. CPU-only installs need no Triton.
"""

from __future__ import annotations

import importlib.util

import torch

from glm130b.quant.format import QuantScheme
from glm130b.quant.kernels.dequant_tiles import dequantize_tiles_linear

# Decided once at import, so torch.compile sees a constant. Without CUDA, triton is never imported
# here (tests import it themselves, after choosing the interpreter).
USE_TRITON = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
if USE_TRITON:
    from glm130b.quant.kernels import triton_quant


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """x [..., in] @ W^T + bias with W held as (packed int8 weight, fp16 scales) of `scheme`."""
    if USE_TRITON and x.is_cuda and triton_quant.supports(scheme, x.shape[-1]):
        return triton_quant.triton_quantized_linear(x, weight, weight_scale, bias, scheme)
    return dequantize_tiles_linear(x, weight, weight_scale, bias, scheme)
