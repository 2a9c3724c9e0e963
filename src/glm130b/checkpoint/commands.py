"""Command-line entry points of this package (checkpoint/official.py, checkpoint/quantized.py)."""

from __future__ import annotations

import argparse

from glm130b.checkpoint.official import convert_official
from glm130b.checkpoint.quantized import quantize_checkpoint
from glm130b.core.dtypes import DTYPES
from glm130b.model.config import GLMConfig
from glm130b.quant.format import QuantScheme


def cmd_convert_official(args) -> int:
    config = GLMConfig.from_preset(args.preset) if args.preset else None
    out = convert_official(args.src, args.dst, config, DTYPES[args.dtype] if args.dtype else None)
    print(f"wrote {out}")
    return 0


def add_convert_official_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder holding 'latest' and <iteration>/mp_rank_XX_model_states.pt")
    parser.add_argument("dst", help="output model directory")
    parser.add_argument("--preset", help="model preset when the folder has no model_config.json (e.g. glm-130b)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast while converting (default: keep)")



def cmd_quantize(args: argparse.Namespace) -> int:
    scheme = QuantScheme(args.bits, args.group_size)
    quantize_checkpoint(args.source, args.destination, scheme)
    print(f"wrote {scheme.name} model to {args.destination}")
    return 0


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="model directory (config.json + model.safetensors) in floating point")
    parser.add_argument("destination", help="directory for the quantized model")
    parser.add_argument("--bits", type=int, required=True, help="4 or 8")
    parser.add_argument("--group-size", type=int, default=None,
                        help="32, 64 or 128 input columns per scale (default: one scale per row, as the paper)")

