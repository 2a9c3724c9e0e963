"""Command-line entry point of this package: `glm130b plan`, the memory per GPU of a training recipe
(distributed/memory_plan.py) or of inference (distributed/inference_plan.py)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from glm130b.core.config_io import check_field, check_positive_int
from glm130b.core.errors import ConfigError
from glm130b.distributed.inference_plan import Devices, format_inference_plan, plan_inference
from glm130b.distributed.memory_plan import Recipe, estimate, format_plan
from glm130b.model.config import PRESETS, GLMConfig


def cmd_plan(args: argparse.Namespace, load_recipe: Callable[[str], Recipe] = Recipe.load) -> int:
    """`load_recipe`: reads --config (the train package passes one that also takes TrainConfig files)."""
    if args.gpus is not None:
        return _plan_inference(args)
    if args.config is None or args.world_size is None:
        raise ConfigError(
            "give --config RECIPE.yaml --world-size N for a training plan, or --gpus COUNTxMEMORY "
            "(with --preset or --model-config) for an inference plan"
        )
    check_positive_int("--world-size", args.world_size)
    if args.gpu_memory_gib is not None:
        check_field("--gpu-memory-gib", args.gpu_memory_gib, float, lambda v: v > 0, "a positive number of GiB")
    recipe = load_recipe(args.config)
    overrides = {k: getattr(args, k) for k in ("tp", "pp", "dp") if getattr(args, k) is not None}
    if overrides:
        recipe = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, **overrides))
    recipe = recipe.resolve(args.world_size)
    print(format_plan(recipe, args.world_size, estimate(recipe), args.gpu_memory_gib))
    return 0


def _plan_inference(args: argparse.Namespace) -> int:
    if args.model_config:
        config = GLMConfig.load(args.model_config)
    elif args.preset:
        config = GLMConfig.from_preset(args.preset)
    else:
        raise ConfigError("an inference plan needs the model: --preset NAME or --model-config FILE")
    devices = Devices.parse(args.gpus)
    memory = plan_inference(config, devices.count, args.bits, args.group_size, args.context, args.batch)
    print(format_inference_plan(config, devices, args.bits, memory, args.context, args.batch))
    return 0


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    training = plan.add_argument_group("training plan")
    training.add_argument(
        "--config",
        help="a recipe YAML (model, parallel, training sections) or a pretrain config (configs/glm-130b.yaml)",
    )
    training.add_argument("--world-size", type=int, help="number of GPUs (processes)")
    for name in ("tp", "pp", "dp"):
        training.add_argument(f"--{name}", type=int, help=f"override parallel.{name}")
    training.add_argument("--gpu-memory-gib", type=float, help="say whether the peak fits this much memory per GPU")
    inference = plan.add_argument_group("inference plan (tensor parallel over the GPUs)")
    inference.add_argument("--gpus", help="COUNTxMEMORY, e.g. 8x40GB or 4x24GB")
    inference.add_argument("--preset", choices=sorted(PRESETS), help="the model, by preset name")
    inference.add_argument(
        "--model-config", help="the model, as a GLMConfig YAML/JSON (e.g. a model directory's config.json)"
    )
    inference.add_argument("--bits", type=int, choices=(4, 8), help="weight-only quantization (default: fp16)")
    inference.add_argument("--group-size", type=int, help="quantization group size (default: one scale per row)")
    inference.add_argument("--context", type=int, default=2048, help="tokens per sequence (default: %(default)s)")
    inference.add_argument("--batch", type=int, default=1, help="sequences generated at once (default: %(default)s)")
