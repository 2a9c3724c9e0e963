"""`glm130b ablate`: train a grid of stability switches and write its report."""

from __future__ import annotations

import argparse
import shlex
import sys

from glm130b.ablation.findings import label
from glm130b.ablation.grid import SWITCHES, Grid, parse_grid, provoked
from glm130b.ablation.report import write_grid_report
from glm130b.ablation.runner import run_grid
from glm130b.ablation.spikes import SpikeRule
from glm130b.train.config import TrainConfig


def cmd_ablate(args: argparse.Namespace) -> int:
    base = provoked(TrainConfig.load(args.config, args.set), args.steps, args.lr_multiplier, args.warmup_multiplier)
    grid = Grid(base, parse_grid(args.grid), args.seeds, args.out)
    rule = SpikeRule(
        factor=args.spike_factor,
        grad_factor=args.grad_spike_factor,
        window=args.spike_window,
        min_history=min(args.spike_window, SpikeRule.min_history),
    ).validate()
    command = shlex.join(["glm130b", *sys.argv[1:]])
    total = len(grid.runs())

    def finished(run, result) -> None:
        valid = ", ".join(f"{k} {v:.4f}" for k, v in result["valid_loss"].items()) or "no validation loss"
        print(
            f"[ablate] {run.name} ({label(run.setting)}, seed {result['seed']}) on {result['device']}: "
            f"{result['steps']} steps, {valid}{', stopped: ' + result['stopped'] if result['stopped'] else ''} "
            f"({result['seconds']:.0f} s)",
            flush=True,
        )
        write_grid_report(grid, rule, command)

    devices = args.devices.split(",") if args.devices else None
    trained = run_grid(grid, devices=devices, on_finished=finished, show_progress=not devices or len(devices) == 1)
    print(f"[ablate] {total - len(trained)} of {total} runs were already finished; trained {len(trained)}")
    print(f"report: {write_grid_report(grid, rule, command)}")
    return 0


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="the base run: a TrainConfig YAML with corpus, valid_corpus and tokenizer (configs/ablation-cpu.yaml)",
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="SWITCH=V1,V2",
        help="switches and their values: "
        + "; ".join(
            f"{name} ({', '.join(s.choices) if s.choices else 'numbers'}): {s.meaning}" for name, s in SWITCHES.items()
        ),
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs per setting; seed i initialises every setting alike")
    parser.add_argument("--steps", type=int, required=True, help="updates per run")
    parser.add_argument(
        "--out", default="runs/ablation", help="output folder; run again to continue an interrupted grid"
    )
    parser.add_argument(
        "--lr-multiplier",
        type=float,
        default=1.0,
        help="provocation: the base's peak and final learning rate times this",
    )
    parser.add_argument(
        "--warmup-multiplier",
        type=float,
        default=1.0,
        help="provocation: the base's warmup times this (below 1: a shorter warmup)",
    )
    parser.add_argument(
        "--devices",
        help="comma-separated devices, one worker process each (cuda:0,cuda:1); "
        "default: the base config's device, runs one after another",
    )
    parser.add_argument(
        "--spike-factor",
        type=float,
        default=SpikeRule.factor,
        help="a spike is a loss this many times the running median of recent healthy steps",
    )
    parser.add_argument(
        "--grad-spike-factor",
        type=float,
        default=SpikeRule.grad_factor,
        help="a gradient-norm spike is a norm this many times its running median",
    )
    parser.add_argument(
        "--spike-window",
        type=int,
        default=SpikeRule.window,
        help="healthy steps in the running median; a spike lasting this long to the end is divergence",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base config, e.g. --set spike_guard.enabled=false (repeatable)",
    )
