"""Streamed quantization of a model directory (`glm130b quantize SRC DST --bits 4 [--group-size 128]`).

The scheme is recorded in the safetensors metadata; glm130b.checkpoint.model_dir.load_model sees it
and builds the quantized model on the meta device, so fp16 weights of the whole model never exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from glm130b.checkpoint.model_dir import WEIGHTS_FILE, load_config, save_config
from glm130b.checkpoint.safetensors import SafetensorsReader, write_streaming
from glm130b.core.errors import CheckpointError
from glm130b.model.config import GLMConfig
from glm130b.quant.format import QuantizationError, QuantScheme, quantize_weight
from glm130b.quant.linear import QUANTIZED_LINEARS, QUANTIZED_WEIGHT, SCALE_SUFFIX

# Source bytes read per block while quantizing: tiny next to one GLM-130B layer (3.2 GB in fp16),
# still ~40 rows of its widest matrix, so reads stay large and sequential.
STREAM_BLOCK_BYTES = 2**20


def quantize_checkpoint(source: str | Path, destination: str | Path, scheme: QuantScheme,
                        progress: bool = True) -> Path:
    """Quantize model directory `source` into `destination`, one tensor at a time.

    Host memory holds one output tensor (at most the fp16 embedding, the size of about one
    GLM-130B layer; a packed weight is 1/4 or 1/8 of its fp16 size) plus one block of source rows;
    source tensors are never held whole. The output appears under its name only when complete.
    """
    source, destination = Path(source), Path(destination)
    config = load_config(source)
    weights = source / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the directory holds a config but no weights")
    if destination.resolve() == source.resolve():
        raise QuantizationError("the destination is the source directory; write the quantized model to a new directory")
    reader = SafetensorsReader(weights)
    recorded = QuantScheme.from_metadata(reader.metadata, str(weights))
    if recorded is not None:
        raise QuantizationError(f"{source} is already quantized ({recorded.name}); quantize the floating-point model")
    _check_quantizable(config, reader, scheme, weights)
    specs = []
    for name, info in reader.tensors.items():
        if QUANTIZED_WEIGHT.fullmatch(name):
            specs += [(name, torch.int8, scheme.packed_shape(*info.shape)),
                      (name + SCALE_SUFFIX, torch.float16, scheme.scale_shape(*info.shape))]
        else:
            specs.append((name, info.dtype, info.shape))
    destination.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(info.nbytes for info in reader.tensors.values()), unit="B", unit_scale=True,
              desc=f"quantize {scheme.name}", disable=not progress) as bar:
        write_streaming(destination / WEIGHTS_FILE, specs, _stream_tensors(reader, scheme, bar),
                        {**reader.metadata, **scheme.to_metadata()})
    save_config(config, destination)
    return destination


def _stream_tensors(reader: SafetensorsReader, scheme: QuantScheme, bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors in `specs` order, each assembled from blocks of source rows."""
    for name, info in reader.tensors.items():
        step = max(1, STREAM_BLOCK_BYTES // max(1, info.row_bytes))
        if not QUANTIZED_WEIGHT.fullmatch(name):
            yield name, reader.read_rows(name, 0, info.rows)
            bar.update(info.nbytes)
            continue
        packed = torch.empty(scheme.packed_shape(*info.shape), dtype=torch.int8)
        scale = torch.empty(scheme.scale_shape(*info.shape), dtype=torch.float16)
        for start in range(0, info.rows, step):
            stop = min(start + step, info.rows)
            block = reader.read_rows(name, start, stop)
            packed[start:stop], scale[start:stop] = quantize_weight(block, scheme, name)  # rows are independent
            bar.update(block.numel() * block.element_size())
        yield name, packed
        yield name + SCALE_SUFFIX, scale


def _check_quantizable(config: GLMConfig, reader: SafetensorsReader, scheme: QuantScheme, weights: Path) -> None:
    """Fail before writing anything: every layer's linears present, every shape fits the scheme."""
    for i in range(config.num_layers):
        for path in QUANTIZED_LINEARS:
            name = f"transformer.layers.{i}.{path}.weight"
            if name not in reader.tensors:
                raise CheckpointError(f"{weights} has no tensor {name}, which its config implies")
            scheme.check_shape(*reader.tensors[name].shape, what=name)
