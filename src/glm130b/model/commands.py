"""Command-line entry point of the model package: `glm130b info`."""

from __future__ import annotations

import argparse

import torch

from glm130b.model.config import PRESETS, GLMConfig
from glm130b.model.glm import GLM


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


def add_info_arguments(info: argparse.ArgumentParser) -> None:
    which = info.add_mutually_exclusive_group()
    which.add_argument("--preset", default="glm-130b", choices=sorted(PRESETS))
    which.add_argument("--config", help="a GLMConfig YAML or JSON file")
