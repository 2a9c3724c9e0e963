"""Command-line entry points of this package (train/pretrain.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from glm130b.core.config_io import read_mapping
from glm130b.core.errors import GLMError
from glm130b.distributed import commands as distributed_commands
from glm130b.distributed.memory_plan import Recipe, TrainingSchedule
from glm130b.train.config import TrainConfig, add_config_arguments, apply_overrides, overrides_from_args
from glm130b.train.pretrain import discard_run, run_pretraining


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    if not args.config and not any(o.startswith(("model_preset=", "model.")) for o in overrides):
        raise GLMError(
            "no model chosen: pass --config FILE (configs/demo.yaml trains a 0.84M-parameter model on a CPU "
            "in minutes; configs/glm-130b.yaml is the full recipe) or --model_preset NAME (glm-10m, glm-tiny, ...)"
        )
    config = (
        TrainConfig.load(args.config, overrides)
        if args.config
        else TrainConfig.from_dict(apply_overrides({}, overrides))
    )
    if args.restart:
        discard_run(Path(config.out_dir))
    result = run_pretraining(config)
    print(f"model: {result.model_dir}")
    if result.loss_curve is not None:
        print(f"loss curve: {result.loss_curve}")
    for language, loss in result.valid_losses.items():
        print(f"validation loss {language}: {loss:.4f}")
    return 0


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TrainConfig YAML file (configs/*.yaml); options below override it")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the run already in out_dir (its checkpoints, metrics, exported model and settings) "
        "and start a new one there",
    )
    add_config_arguments(parser)


def load_plan_config(path: str) -> Recipe:
    """A recipe file (model, parallel, training sections), or a pretrain TrainConfig file read and
    checked exactly as `glm130b pretrain` reads it: one file serves both commands."""
    if "training" in read_mapping(path, "recipe"):
        return Recipe.load(path)
    config = TrainConfig.load(path)
    schedule = TrainingSchedule(config.global_batch_size, config.micro_batch_size, config.sequence_length)
    return Recipe(config.model_config(), config.parallel, schedule)


def cmd_plan(args: argparse.Namespace) -> int:
    """`glm130b plan`, reading --config with load_plan_config."""
    return distributed_commands.cmd_plan(args, load_recipe=load_plan_config)
