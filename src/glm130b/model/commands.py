"""Command-line entry point of the model package: `glm130b info` describes a model directory, a
GLMConfig file or a preset."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from glm130b.core.errors import GLMError
from glm130b.model.config import PRESETS, GLMConfig
from glm130b.model.glm import GLM

GIB = 2**30
CONFIG_FILE = "config.json"  # the config of a model directory (glm130b.checkpoint writes it)
# Bytes per parameter of the four linear layers at each width (+ fp16 scales, negligible), and of the rest.
WIDTHS = (("fp16", 2.0), ("INT8", 1.0), ("INT4", 0.5))


def describe(config: GLMConfig) -> list[str]:
    with torch.device("meta"):
        model = GLM(config)
    total = model.num_parameters()
    linear = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("transformer.layers.") and name.endswith(".weight") and p.dim() == 2
    )
    lines = [
        f"layers {config.num_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}, "
        f"vocab {config.vocab_size}, ffn {config.ffn} {config.inner_hidden_size}, "
        f"positions {config.position_encoding} up to {config.max_sequence_length}",
        f"parameters: {total:,}",
    ]
    lines += [
        f"weights with {name} linears: {(linear * width + (total - linear) * 2) / GIB:,.2f} GiB"
        for name, width in WIDTHS
    ]
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    """Build the model on the meta device (no memory) and print its size."""
    if args.model is not None:
        folder = Path(args.model)
        if not (folder / CONFIG_FILE).is_file():
            raise GLMError(
                f"{folder} is not a model directory ({CONFIG_FILE} is missing); give a folder written "
                "by glm130b (pretrain, convert, quantize), or --preset NAME / --config FILE"
            )
        config = GLMConfig.load(folder / CONFIG_FILE)
        lines = describe(config)
        weights = sorted(folder.glob("*.safetensors"))
        lines.append(
            f"on disk: {sum(w.stat().st_size for w in weights) / GIB:,.2f} GiB in {len(weights)} safetensors file(s)"
        )
        lines.append(f"tokenizer: {folder / 'tokenizer' if (folder / 'tokenizer').is_dir() else 'none in the folder'}")
    elif args.config or args.preset:
        lines = describe(GLMConfig.load(args.config) if args.config else GLMConfig.from_preset(args.preset))
    else:
        raise GLMError("say which model: glm130b info MODEL_DIR, --preset NAME (e.g. glm-130b) or --config FILE")
    print("\n".join(lines))
    return 0


def add_info_arguments(info: argparse.ArgumentParser) -> None:
    info.add_argument("model", nargs="?", help="a model directory (config.json + safetensors)")
    which = info.add_mutually_exclusive_group()
    which.add_argument("--preset", choices=sorted(PRESETS), help="describe a preset instead")
    which.add_argument("--config", help="describe a GLMConfig YAML or JSON file instead")
