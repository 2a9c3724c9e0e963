"""Command-line entry points of this package (train/pretrain.py)."""

from __future__ import annotations

import argparse

from glm130b.train.config import TrainConfig, add_config_arguments, apply_overrides, overrides_from_args
from glm130b.train.pretrain import run_pretraining


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    config = (
        TrainConfig.load(args.config, overrides)
        if args.config
        else TrainConfig.from_dict(apply_overrides({}, overrides))
    )
    result = run_pretraining(config)
    print(f"model: {result.model_dir}")
    if result.loss_curve is not None:
        print(f"loss curve: {result.loss_curve}")
    for language, loss in result.valid_losses.items():
        print(f"validation loss {language}: {loss:.4f}")
    return 0


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TrainConfig YAML file (configs/*.yaml); options below override it")
    add_config_arguments(parser)
