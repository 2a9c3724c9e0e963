"""The portable quantized linear: dequantize the weight a tile of output rows at a time, multiply.

Runs wherever torch runs (the CPU path, and the fallback on a GPU without Triton). Only one tile of
the weight exists in floating point at any time, never the whole matrix; the same holds for the
gradient with respect to the input (the backward of a frozen quantized layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm130b.quant.format import QuantScheme, dequantize_weight

# Floating-point elements of one dequantized tile: 2^20 is 4 MiB in fp32, small next to the model
# and the activations, large enough that each tile is one efficient matrix product.
TILE_ELEMENTS = 2**20


def dequantize_tiles_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """x [..., in] @ dequantized(weight, scale)^T + bias -> [..., out] in x.dtype."""
    out_features = weight.shape[0]
    in_features = x.shape[-1]
    rows_per_tile = max(1, TILE_ELEMENTS // in_features)
    y = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, rows_per_tile):
        rows = slice(start, min(start + rows_per_tile, out_features))
        w = dequantize_weight(weight[rows], scale[rows], scheme, x.dtype)  # [rows, in]
        y[..., rows] = F.linear(x, w, None if bias is None else bias[rows].to(x.dtype))
    return y


def dequantize_tiles_input_grad(
    grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme, in_features: int
) -> torch.Tensor:
    """grad [..., out] @ dequantized(weight, scale) -> [..., in] in grad.dtype: the gradient of
    dequantize_tiles_linear's output with respect to its input x."""
    out_features = weight.shape[0]
    rows_per_tile = max(1, TILE_ELEMENTS // in_features)
    grad_x = grad.new_zeros(*grad.shape[:-1], in_features)
    for start in range(0, out_features, rows_per_tile):
        rows = slice(start, min(start + rows_per_tile, out_features))
        w = dequantize_weight(weight[rows], scale[rows], scheme, grad.dtype)  # [rows, in]
        grad_x += grad[..., rows] @ w
    return grad_x
