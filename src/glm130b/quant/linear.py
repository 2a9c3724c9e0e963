"""Weight-only INT8/INT4 quantization of a GLM as a module swap (gpt-fast's way).

The four linear layers of every block (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
become QuantizedLinear: a drop-in nn.Linear with an int8 `weight`, fp16 `weight_scale` and the
floating-point `bias`. Embedding (so the tied head), LayerNorms and biases stay floating point
(SPEC.md section 7). Streamed conversion of checkpoints is glm130b.checkpoint.quantized's job.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from glm130b.model.glm import GLM
from glm130b.quant.format import QuantScheme, dequantize_weight, quantize_weight
from glm130b.quant.kernels import quantized_linear

# The linear layers that are quantized, by module path inside each block.
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
QUANTIZED_WEIGHT = re.compile(
    r"transformer\.layers\.\d+\.(" + "|".join(map(re.escape, QUANTIZED_LINEARS)) + r")\.weight"
)
SCALE_SUFFIX = "_scale"  # the key of a quantized weight's scales: `<weight key>_scale`


class QuantizedLinear(nn.Module):
    """nn.Linear with a weight-only quantized weight: same forward signature, bias kept."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        scheme.check_shape(out_features, in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer(
            "weight", torch.empty(scheme.packed_shape(out_features, in_features), dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale",
            torch.empty(scheme.scale_shape(out_features, in_features), dtype=torch.float16, device=device),
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, name: str = "linear") -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, scheme, linear.bias is not None, device="meta")
        weight, scale = quantize_weight(linear.weight.detach(), scheme, name)
        module.weight, module.weight_scale = weight, scale
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """The floating-point nn.Linear this layer computes: its weight dequantized, its bias kept."""
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=self.weight.device, dtype=dtype
        )
        linear.weight.copy_(dequantize_weight(self.weight, self.weight_scale, self.scheme, dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.weight_scale, self.bias, self.scheme)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"bias={self.bias is not None}"
        )


def _quantized_linears(model: GLM):
    for i, block in enumerate(model.transformer.layers):
        for path in QUANTIZED_LINEARS:
            parent_name, child_name = path.split(".")
            yield f"transformer.layers.{i}.{path}", getattr(block, parent_name), child_name


def replace_linears(model: GLM, scheme: QuantScheme) -> GLM:
    """Swap the quantized linears for empty QuantizedLinear modules (for loading; any device, meta too)."""
    for name, parent, child in _quantized_linears(model):
        linear = getattr(parent, child)
        layer_scheme = scheme.for_linear(name, linear.in_features)
        layer_scheme.check_shape(linear.out_features, linear.in_features, name)
        setattr(
            parent,
            child,
            QuantizedLinear(
                linear.in_features,
                linear.out_features,
                layer_scheme,
                linear.bias is not None,
                linear.weight.device,
                linear.weight.dtype,
            ),
        )
    return model


@torch.no_grad()
def quantize_model(model: GLM, scheme: QuantScheme) -> GLM:
    """Quantize a loaded model in place (small models; large ones stream through `glm130b quantize` or `convert --bits`)."""
    for name, parent, child in _quantized_linears(model):
        linear = getattr(parent, child)
        setattr(parent, child, QuantizedLinear.from_linear(linear, scheme.for_linear(name, linear.in_features), name))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap every QuantizedLinear (wherever it sits, e.g. inside an adapter's wrapper) for the
    floating-point nn.Linear it computes, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                setattr(module, name, child.to_linear(dtype))
    return model
