"""`glm130b info`: the shape of a model directory, GLMConfig file or preset (glm130b.model.commands),
and for a directory what its weights hold: dtype or quantization scheme, bytes on disk, tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from glm130b.checkpoint.model_dir import CONFIG_FILE
from glm130b.checkpoint.safetensors import SafetensorsReader, safetensors_files
from glm130b.core.errors import GLMError
from glm130b.model.commands import GIB, describe
from glm130b.model.config import PRESETS, GLMConfig
from glm130b.quant.format import QuantScheme


def describe_weights(folder: Path) -> list[str]:
    """Lines on a model directory's weights; every file's header is read, so a truncated copy is an
    error here rather than at load time."""
    files = safetensors_files(folder)
    readers = [SafetensorsReader(file) for file in files]
    if not readers:
        return ["weights: none (the folder holds a config only)"]
    scheme = QuantScheme.from_metadata(readers[0].metadata, str(files[0]))
    dtypes = sorted({str(info.dtype).removeprefix("torch.") for r in readers for info in r.tensors.values()})
    held = f"quantized, {scheme.name}" if scheme is not None else "/".join(dtypes)
    size = sum(file.stat().st_size for file in files)
    return [f"weights: {held}", f"on disk: {size / GIB:,.2f} GiB in {len(files)} safetensors file(s)"]


def cmd_info(args: argparse.Namespace) -> int:
    """Build the model on the meta device (no memory) and print its size."""
    if args.model is not None:
        folder = Path(args.model)
        if not (folder / CONFIG_FILE).is_file():
            raise GLMError(
                f"{folder} is not a model directory ({CONFIG_FILE} is missing); give a folder written "
                "by glm130b (pretrain, convert, quantize), or --preset NAME / --config FILE"
            )
        lines = describe(GLMConfig.load(folder / CONFIG_FILE)) + describe_weights(folder)
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
