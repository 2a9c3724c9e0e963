"""Weight-only INT8/INT4 quantization of a GLM: the QuantizedLinear module swap, the streaming
checkpoint converter (`glm130b quantize SRC DST --bits 4 [--group-size 128]`) and quantized loading.

As in gpt-fast: the model code stays unchanged; quantization replaces the four linear layers of
every block (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) by QuantizedLinear, a drop-in
nn.Linear with an int8 `weight`, fp16 `weight_scale` and the floating-point `bias`. The embedding
(and so the tied output head), LayerNorms and biases stay in floating point (SPEC.md section 7).
The scheme is recorded in the safetensors metadata; `glm130b.checkpoint.load_model` sees it and
builds the quantized model on the meta device, so fp16 weights of the whole model never exist.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from glm130b.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_config, save_config, write_streaming
from glm130b.config import GLMConfig
from glm130b.kernels import quantized_linear
from glm130b.model import GLM
from glm130b.quant_format import QuantizationError, QuantScheme, quantize_weight
from glm130b.safetensors_reader import SafetensorsReader

# The linear layers that are quantized, by module path inside each block.
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_QUANTIZED_WEIGHT = re.compile(r"transformer\.layers\.\d+\.(" + "|".join(map(re.escape, QUANTIZED_LINEARS)) + r")\.weight")
SCALE_SUFFIX = "_scale"
# Source bytes read per block while quantizing: tiny next to one GLM-130B layer (3.2 GB in fp16),
# still ~40 rows of its widest matrix, so reads stay large and sequential.
STREAM_BLOCK_BYTES = 2**20


class QuantizedLinear(nn.Module):
    """nn.Linear with a weight-only quantized weight: same forward signature, bias kept."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        scheme.check_shape(out_features, in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.empty(scheme.packed_shape(out_features, in_features),
                                                   dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(scheme.scale_shape(out_features, in_features),
                                                         dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, name: str = "linear") -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, scheme, linear.bias is not None, device="meta")
        weight, scale = quantize_weight(linear.weight.detach(), scheme, name)
        module.weight, module.weight_scale = weight, scale
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.weight_scale, self.bias, self.scheme)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, " \
               f"bias={self.bias is not None}"


def _quantized_linears(model: GLM):
    for i, block in enumerate(model.transformer.layers):
        for path in QUANTIZED_LINEARS:
            parent_name, child_name = path.split(".")
            yield f"transformer.layers.{i}.{path}", getattr(block, parent_name), child_name


def replace_linears(model: GLM, scheme: QuantScheme) -> GLM:
    """Swap the quantized linears for empty QuantizedLinear modules (for loading; any device, meta too)."""
    for name, parent, child in _quantized_linears(model):
        linear = getattr(parent, child)
        scheme.check_shape(linear.out_features, linear.in_features, name)
        setattr(parent, child, QuantizedLinear(linear.in_features, linear.out_features, scheme,
                                               linear.bias is not None, linear.weight.device, linear.weight.dtype))
    return model


@torch.no_grad()
def quantize_model(model: GLM, scheme: QuantScheme) -> GLM:
    """Quantize a loaded model in place (small models; large ones stream with quantize_checkpoint)."""
    for name, parent, child in _quantized_linears(model):
        setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child), scheme, name))
    return model


# ---------------------------------------------------------------------------------- streaming
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
        if _QUANTIZED_WEIGHT.fullmatch(name):
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
        if not _QUANTIZED_WEIGHT.fullmatch(name):
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


# ---------------------------------------------------------------------------------- loading
def load_quantized_model(directory: Path, config: GLMConfig, scheme: QuantScheme,
                         device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GLM:
    """Called by glm130b.checkpoint.load_model for a checkpoint whose metadata records `scheme`."""
    weights = directory / WEIGHTS_FILE
    with torch.device("meta"):
        model = replace_linears(GLM(config), scheme)
    state = load_file(str(weights), device=str(device))
    if dtype is not None:  # packed values stay int8 and scales stay fp16 whatever the compute dtype
        state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith(SCALE_SUFFIX) else v
                 for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not match {directory / CONFIG_FILE} quantized as {scheme.name}: "
                              f"{err}") from None
    return model.eval()


# ---------------------------------------------------------------------------------- command line
def cmd_quantize(args: argparse.Namespace) -> int:
    scheme = QuantScheme(args.bits, args.group_size)
    quantize_checkpoint(args.source, args.destination, scheme)
    print(f"wrote {scheme.name} model to {args.destination}")
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="weight-only INT8/INT4 quantization of a model directory (streamed, no calibration)")
    parser.add_argument("source", help="model directory (config.json + model.safetensors) in floating point")
    parser.add_argument("destination", help="directory for the quantized model")
    parser.add_argument("--bits", type=int, required=True, help="4 or 8")
    parser.add_argument("--group-size", type=int, default=None,
                        help="32, 64 or 128 input columns per scale (default: one scale per row, as the paper)")
    parser.set_defaults(func=cmd_quantize)
