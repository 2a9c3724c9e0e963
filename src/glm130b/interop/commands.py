"""Command-line entry points of checkpoint conversion: `convert`, `convert-official` and `quantize`."""

from __future__ import annotations

import argparse

from glm130b.core.dtypes import DTYPES
from glm130b.interop.convert import DEFAULT_MAX_SHARD_BYTES, TARGETS, convert
from glm130b.model.config import PRESETS
from glm130b.quant.format import QuantScheme


def _scheme(args: argparse.Namespace) -> QuantScheme | None:
    return QuantScheme(args.bits, args.group_size, args.official_tp) if args.bits else None


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert(
        args.src,
        args.dst,
        to=args.to,
        tp=args.tp,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        scheme=_scheme(args),
        preset=args.preset,
        max_shard_bytes=int(args.max_shard_gb * 10**9),
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point weights (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination folder")


def _add_quantization(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--bits",
        type=int,
        choices=(4, 8),
        required=required,
        help="weight-only quantization while writing (default: none)" if not required else "4 or 8",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="32, 64 or 128 input columns per scale (default: one scale per row, as the paper)",
    )
    parser.add_argument(
        "--official-tp",
        type=int,
        default=None,
        metavar="N",
        help="scales as the official runtime computes them after splitting the model over N "
        "tensor-parallel ranks (one per row and rank in dense and dense_4h_to_h)",
    )


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="a model directory, a Hugging Face folder (ours or ChatGLM-6B's) or an "
        "official checkpoint folder (holding 'latest')",
    )
    parser.add_argument("dst", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument(
        "--to",
        choices=TARGETS,
        default="dir",
        help="dir: model directory; official: SAT tensor-parallel shards; hf: Hugging Face folder "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel degree of --to official shards (default: %(default)s)"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="model shape when official shards come without model_config.json"
    )
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_MAX_SHARD_BYTES / 10**9,
        help="split safetensors weights into files of at most this size (default: %(default)s)",
    )
    _add_common(parser)
    _add_quantization(parser, required=False)


def cmd_convert_official(args: argparse.Namespace) -> int:
    out = convert(
        args.src,
        args.dst,
        to="dir",
        dtype=DTYPES[args.dtype] if args.dtype else None,
        preset=args.preset,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def add_convert_official_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder holding 'latest' and <iteration>/mp_rank_XX_model_states.pt")
    parser.add_argument("dst", help="output model directory")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="model preset when the folder has no model_config.json (e.g. glm-130b)",
    )
    _add_common(parser)


def cmd_quantize(args: argparse.Namespace) -> int:
    scheme = _scheme(args)
    convert(args.source, args.destination, to="dir", scheme=scheme, overwrite=args.overwrite)
    print(f"wrote {scheme.name} model to {args.destination}")
    return 0


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="model directory (config.json + model.safetensors) in floating point")
    parser.add_argument("destination", help="directory for the quantized model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination folder")
    _add_quantization(parser, required=True)
