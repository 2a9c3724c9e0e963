"""Command-line entry points of this package (distributed/memory_plan.py)."""

from __future__ import annotations

import argparse
import dataclasses

from glm130b.distributed.memory_plan import Recipe, estimate, format_plan


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = Recipe.load(args.config)
    overrides = {k: getattr(args, k) for k in ("tp", "pp", "dp") if getattr(args, k) is not None}
    if overrides:
        recipe = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, **overrides))
    recipe = recipe.resolve(args.world_size)
    print(format_plan(recipe, args.world_size, estimate(recipe), args.gpu_memory_gib))
    return 0


def add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("--config", required=True, help="a recipe YAML (model, parallel, training sections)")
    plan.add_argument("--world-size", type=int, required=True, help="number of GPUs (processes)")
    for name in ("tp", "pp", "dp"):
        plan.add_argument(f"--{name}", type=int, help=f"override parallel.{name}")
    plan.add_argument("--gpu-memory-gib", type=float, help="say whether the peak fits this much memory per GPU")

