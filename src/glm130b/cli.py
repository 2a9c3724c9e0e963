"""The `glm130b` command: one entry point, each subcommand a plain function.

Feature modules add their own subcommands: each module named in COMMAND_MODULES defines
`add_commands(subparsers)`, which adds parsers whose `func` default takes the parsed args and
returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from glm130b.config import PRESETS, GLMConfig
from glm130b.errors import GLMError
from glm130b.model import GLM

COMMAND_MODULES: tuple[str, ...] = ("glm130b.official", "glm130b.quantize", "glm130b.memory_estimate",
                                   "glm130b.tokenizer", "glm130b.generation", "glm130b.data",
                                   "glm130b.trainer", "glm130b.demo")


def _model_config(args: argparse.Namespace) -> GLMConfig:
    return GLMConfig.load(args.config) if args.config else GLMConfig.from_preset(args.preset)


def cmd_info(args: argparse.Namespace) -> int:
    """Build the model on the meta device (no memory) and print its size."""
    config = _model_config(args)
    with torch.device("meta"):
        model = GLM(config)
    n = model.num_parameters()
    print(f"layers {config.num_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
          f"vocab {config.vocab_size}, ffn {config.ffn} {config.inner_hidden_size}, "
          f"positions {config.position_encoding} up to {config.max_sequence_length}")
    print(f"parameters: {n:,}")
    for name, bytes_per in (("fp32", 4), ("fp16/bf16", 2)):
        print(f"weights in {name}: {n * bytes_per / 2**30:,.1f} GiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm130b", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a model's shape and parameter count")
    which = info.add_mutually_exclusive_group()
    which.add_argument("--preset", default="glm-130b", choices=sorted(PRESETS))
    which.add_argument("--config", help="a GLMConfig YAML or JSON file")
    info.set_defaults(func=cmd_info)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GLMError as err:
        print(f"glm130b: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
