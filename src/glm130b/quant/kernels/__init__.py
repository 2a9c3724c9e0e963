"""Quantized linear products: fused Triton kernels on CUDA, dequantize-by-tiles everywhere else.

`quantized_linear(x, weight, weight_scale, bias, scheme)` is the one entry point; QuantizedLinear
(glm130b.quant.linear) calls it. CPU-only installs need no Triton. It is differentiable in x and
the bias (the weight is frozen), so adapters over a quantized base train through it.
"""

from __future__ import annotations

import importlib.util

import torch

from glm130b.quant.format import QuantScheme
from glm130b.quant.kernels.dequant_tiles import dequantize_tiles_input_grad, dequantize_tiles_linear

# Decided once at import, so torch.compile sees a constant. Without CUDA, triton is never imported
# here (tests import it themselves, after choosing the interpreter).
USE_TRITON = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
if USE_TRITON:
    from glm130b.quant.kernels import triton_quant


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """x [..., in] @ W^T + bias with W held as (packed int8 weight, fp16 scales) of `scheme`."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenQuantizedLinear.apply(x, weight, weight_scale, bias, scheme)
    return _forward(x, weight, weight_scale, bias, scheme)


def _forward(x, weight, weight_scale, bias, scheme) -> torch.Tensor:
    if USE_TRITON and x.is_cuda and triton_quant.supports(scheme, x.shape[-1]):
        return triton_quant.triton_quantized_linear(x, weight, weight_scale, bias, scheme)
    return dequantize_tiles_linear(x, weight, weight_scale, bias, scheme)


class _FrozenQuantizedLinear(torch.autograd.Function):
    """The product with a frozen quantized weight. The backward dequantizes tile by tile again
    instead of keeping the dequantized weight from the forward (which would cost the float model's
    memory); it saves nothing of x, as no weight gradient is needed."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, scheme):
        ctx.save_for_backward(weight, weight_scale)
        ctx.scheme, ctx.in_features, ctx.has_bias = scheme, x.shape[-1], bias is not None
        return _forward(x, weight, weight_scale, bias, scheme)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = dequantize_tiles_input_grad(grad, weight, weight_scale, ctx.scheme, ctx.in_features)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32)
        return grad_x, None, None, grad_bias, None
