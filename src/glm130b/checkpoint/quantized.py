"""Streamed quantization: the tensors of a TensorSource with every quantizable weight packed on the
way, one block of source rows at a time (no calibration, SPEC.md section 7)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from glm130b.checkpoint.sources import BLOCK_BYTES, TensorSource, TensorSpec, quantization_of, read_tensor
from glm130b.quant.format import QuantizationError, QuantScheme, quantize_weight
from glm130b.quant.linear import QUANTIZED_LINEARS, QUANTIZED_WEIGHT, SCALE_SUFFIX


def check_quantizable(source: TensorSource, scheme: QuantScheme) -> None:
    """Fail before writing anything: floating-point source, every layer's linears present, every
    shape fits the scheme."""
    recorded = quantization_of(source)
    if recorded is not None:
        raise QuantizationError(f"the source is already quantized ({recorded.name}); quantize the floating-point model")
    shapes = {s.name: s.shape for s in source.specs()}
    for i in range(source.config.num_layers):
        for path in QUANTIZED_LINEARS:
            name = f"transformer.layers.{i}.{path}.weight"
            if name not in shapes:
                raise QuantizationError(f"the source has no tensor {name}, which its config implies")
            scheme.for_linear(name.removesuffix(".weight"), shapes[name][1]).check_shape(*shapes[name], what=name)


def quantized_specs(specs: list[TensorSpec], scheme: QuantScheme) -> list[TensorSpec]:
    out = []
    for spec in specs:
        if QUANTIZED_WEIGHT.fullmatch(spec.name):
            layer = scheme.for_linear(spec.name.removesuffix(".weight"), spec.shape[1])
            out += [
                TensorSpec(spec.name, torch.int8, layer.packed_shape(*spec.shape)),
                TensorSpec(spec.name + SCALE_SUFFIX, torch.float16, layer.scale_shape(*spec.shape)),
            ]
        else:
            out.append(spec)
    return out


def quantized_tensors(
    source: TensorSource, scheme: QuantScheme, dtype: torch.dtype | None = None, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of quantized_specs(source.specs()) in order: packed weights and their scales
    assembled from row blocks (rows quantize independently); the rest cast to `dtype` if given."""
    for spec in source.specs():
        if not QUANTIZED_WEIGHT.fullmatch(spec.name):
            tensor = read_tensor(source, spec.name)
            yield spec.name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            continue
        layer = scheme.for_linear(spec.name.removesuffix(".weight"), spec.shape[1])
        packed = torch.empty(layer.packed_shape(*spec.shape), dtype=torch.int8)
        scale = torch.empty(layer.scale_shape(*spec.shape), dtype=torch.float16)
        start = 0
        for block in source.row_blocks(spec.name, block_bytes):
            block = block.to(dtype) if dtype is not None else block  # quantize what the model would hold
            stop = start + block.shape[0]
            packed[start:stop], scale[start:stop] = quantize_weight(block, layer, spec.name)
            start = stop
        yield spec.name, packed
        yield spec.name + SCALE_SUFFIX, scale
