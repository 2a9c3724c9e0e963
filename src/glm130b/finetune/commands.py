"""Command-line entry points of this package: `glm130b finetune` and `glm130b merge-adapter`."""

from __future__ import annotations

import argparse

from glm130b.adapters.folder import merge_adapter
from glm130b.adapters.lora import LORA_TARGETS
from glm130b.core.atomic import check_output_folder
from glm130b.core.config_io import read_mapping
from glm130b.finetune.config import FINETUNE_DEFAULTS, METHOD_DEFAULTS, METHODS, QUANTIZED, FinetuneConfig
from glm130b.finetune.runner import run_finetune
from glm130b.train.config import apply_overrides, option_help, option_names

# FinetuneConfig fields with their own options (the rest come from --config or --train.<field>).
OPTIONS = {
    "model": "the base model directory",
    "data": "training records (.jsonl)",
    "valid_data": "held-out records: validation loss, and exact match at the end",
    "tokenizer": "tokenizer folder (default: MODEL/tokenizer)",
    "out_dir": "where the run writes",
    "epochs": "passes over the training sequences",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale alpha / rank)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_targets": f"comma-separated, from {','.join(LORA_TARGETS)}",
    "prefix_length": "P-tuning v2 virtual tokens per layer",
}
# TrainConfig fields a fine-tune takes from the base model or from the method, not from the user
# (its examples are packed prompt/target pairs, not the pretraining objective's sample mix).
FIXED_TRAIN_FIELDS = (
    "model_preset",
    "model",
    "corpus",
    "valid_corpus",
    "tokenizer",
    "mip_data",
    "objective",
    "out_dir",
)


def cmd_finetune(args: argparse.Namespace) -> int:
    data = read_mapping(args.config, FinetuneConfig.config_label) if args.config else {}
    for name in (*OPTIONS, "method", "quantized"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    if args.merge:
        data["merge"] = True
    train = [
        f"{k.removeprefix('train:')}={v}" for k, v in vars(args).items() if k.startswith("train:") and v is not None
    ]
    data["train"] = apply_overrides(data.get("train") or {}, train)
    config = FinetuneConfig.from_dict(data)
    check_output_folder(config.out_dir)
    result = run_finetune(config)
    print(
        f"{'model' if config.method == 'full' else 'adapter'}: {result.output_dir} "
        f"({result.trainable_parameters:,} trained parameters)"
    )
    if result.merged_dir is not None:
        print(f"merged model: {result.merged_dir}")
    for name, loss in result.valid_losses.items():
        print(f"validation loss {name}: {loss:.4f}")
    if result.exact_match is not None:
        print(f"exact match on {config.valid_data}: {result.exact_match:.1f} %")
    return 0


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a FinetuneConfig YAML file; options below override it")
    p.add_argument(
        "--method",
        choices=METHODS,
        help="what trains: every weight, LoRA adapters, or P-tuning v2 prefixes (default lora)",
    )
    p.add_argument("--quantized", choices=tuple(QUANTIZED), help="quantize the frozen base on load (lora, ptuning)")
    p.add_argument("--merge", action="store_true", help="also write the base with the LoRA adapter folded in")
    for name, text in OPTIONS.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        p.add_argument(
            *flags,
            dest=name,
            help=text,
            type=float
            if name in ("epochs", "lora_alpha", "lora_dropout")
            else int
            if name in ("lora_rank", "prefix_length")
            else str,
        )
    group = p.add_argument_group("training settings (TrainConfig fields; defaults: glm130b.finetune.config)")
    for name in option_names(exclude=FIXED_TRAIN_FIELDS):
        group.add_argument(
            f"--train.{name}",
            dest=f"train:{name}",
            metavar="VALUE",
            default=argparse.SUPPRESS,
            help=option_help(name, finetune_default(name)),
        )


def finetune_default(name: str) -> str | None:
    """A setting's fine-tuning default as help text, where fine-tuning changes the recipe's."""
    section, _, leaf = name.rpartition(".")
    defaults = FINETUNE_DEFAULTS.get(section, {}) if section else FINETUNE_DEFAULTS
    if leaf in defaults:
        return str(defaults[leaf])
    per_method = [f"{method} {values[leaf]}" for method, values in METHOD_DEFAULTS.items() if leaf in values]
    return ", ".join(per_method) if per_method and not section else None


def cmd_merge_adapter(args: argparse.Namespace) -> int:
    print(f"merged model: {merge_adapter(args.model, args.adapter, args.out)}")
    return 0


def add_merge_adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder (glm130b finetune --method lora)")
    p.add_argument("--out", required=True, help="the merged model directory to write")
