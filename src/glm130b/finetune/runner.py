"""`glm130b finetune` as a function: records packed into sequences, the base model made ready for
its method, the pretraining Trainer (schedule, clipping, mixed precision, spike guard, exact
resume, FSDP2 / TP under torchrun), then the adapter folder or the full model directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from glm130b.adapters.folder import freeze, merge_adapter, quantization_of, save_adapter
from glm130b.adapters.lora import add_lora, lora_config
from glm130b.adapters.prefix import add_prefix
from glm130b.checkpoint.model_dir import load_config, load_model
from glm130b.core.dtypes import DTYPES
from glm130b.core.errors import ConfigError
from glm130b.distributed.parallelize import full_state_dict
from glm130b.finetune.config import TOKENIZER_DIR, FinetuneConfig
from glm130b.finetune.packing import PackedDataset, encode_records, pack
from glm130b.finetune.records import read_records
from glm130b.finetune.scores import exact_match
from glm130b.model.glm import GLM
from glm130b.quant.linear import quantize_model
from glm130b.tokenizer.tokenizers import load_tokenizer
from glm130b.train.builders import build_model_and_optimizer
from glm130b.train.pretrain import export_model
from glm130b.train.trainer import Trainer

ADAPTER_DIR, MODEL_DIR, MERGED_DIR = "adapter", "model", "merged"  # inside out_dir


@dataclass
class FinetuneResult:
    output_dir: Path  # the adapter folder, or the model directory of a full fine-tune
    merged_dir: Path | None  # the base with the LoRA adapter folded in (merge)
    valid_losses: dict[str, float]
    exact_match: float | None  # % on valid_data after training (one-process runs)
    trainable_parameters: int
    metrics_dir: Path
    model: nn.Module  # the trained model (this rank's part of it under torchrun)


def prepare_model(config: FinetuneConfig, device: torch.device, precision: str, seed: int) -> GLM:
    """The base of config.model on `device`, ready for its method (apply_method): whole and fp32
    for a full fine-tune (the master weights), else in the compute dtype (it stays frozen)."""
    dtype = torch.float32 if config.method == "full" or precision == "fp32" else DTYPES[precision]
    return apply_method(load_model(config.model, device=device, dtype=dtype), config, seed)


def apply_method(model: GLM, config: FinetuneConfig, seed: int) -> GLM:
    """`model` (in place) as its method trains it: whole (full), or frozen, quantized when asked,
    with LoRA or a prefix (fp32) added; in train mode."""
    stored = quantization_of(model)
    if config.method == "full" and stored is not None:
        raise ConfigError(
            f"{config.model} is quantized ({stored.name}); full fine-tuning needs the "
            "floating-point model, or use --method lora over this one"
        )
    if config.scheme is not None:
        if stored is None:
            quantize_model(model, config.scheme)
        elif stored.bits != config.scheme.bits:
            raise ConfigError(
                f"{config.model} is stored as {stored.name}, not {config.quantized}; drop "
                "--quantized to use it as it is, or give the floating-point model"
            )
    torch.manual_seed(seed)  # the adapters' initialisation: the same on every rank and every resume
    if config.method == "lora":
        add_lora(
            freeze(model), lora_config(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
        )
    elif config.method == "ptuning":
        add_prefix(freeze(model), config.prefix_length, seed)
    return model.train()


def run_finetune(config: FinetuneConfig, show_progress: bool = True) -> FinetuneResult:
    """Everything `glm130b finetune` does; see the module docstring."""
    if not config.model or not config.data:
        raise ConfigError(
            "set model (the base model directory) and data (the training records), "
            "as --model DIR --data FILE or in the config file"
        )
    tokenizer = load_tokenizer(config.tokenizer_dir())
    base = load_config(config.model)
    if tokenizer.vocab_size > base.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but {config.model} only {base.vocab_size} "
            "embedding rows; give the tokenizer the model was trained with"
        )
    length = config.sequence_length(base)
    packs = pack(encode_records(read_records(config.data), tokenizer, length), length)
    train_config = config.train_config(base, len(packs))
    _check_layout(config, train_config)
    dataset = PackedDataset(
        packs, train_config.micro_batch_size, length, tokenizer.specials.pad, base.position_encoding, train_config.seed
    )
    valid_records = read_records(config.valid_data) if config.valid_data else []
    valid = {}
    if valid_records:
        held_out = pack(encode_records(valid_records, tokenizer, length), length)
        valid["valid"] = PackedDataset(
            held_out, train_config.micro_batch_size, length, tokenizer.specials.pad, base.position_encoding
        ).batches()

    built = build_model_and_optimizer(
        train_config,
        base,
        make_model=lambda device: prepare_model(config, device, train_config.precision, train_config.seed),
    )
    trainer = Trainer(train_config, built, dataset, valid, show_progress=show_progress)
    losses = trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    out = Path(config.out_dir)
    output_dir = out / (MODEL_DIR if config.method == "full" else ADAPTER_DIR)
    _export(trainer, config, output_dir, tokenizer)
    merged = score = None
    if trainer.is_main and config.merge:
        merged = merge_adapter(config.model, output_dir, out / MERGED_DIR)
    if built.mesh is None and valid_records:
        score = exact_match(trainer.model, tokenizer, valid_records)
    if built.mesh is not None:
        dist.barrier()  # the export is complete before any rank returns
        dist.destroy_process_group()
    return FinetuneResult(output_dir, merged, losses, score, trainable, out / "metrics", trainer.model)


def _check_layout(config: FinetuneConfig, train_config) -> None:
    if "RANK" not in os.environ or config.method == "full":
        return
    if train_config.parallel.tp > 1 or train_config.parallel.pp > 1:
        raise ConfigError(
            f"method {config.method} runs data parallel only under torchrun (parallel.tp = "
            "parallel.pp = 1): its frozen base is replicated or FSDP-sharded whole, and the "
            "adapters are too small to split"
        )


def _export(trainer: Trainer, config: FinetuneConfig, directory: Path, tokenizer) -> None:
    """The trained result, written by rank 0 (collective under torchrun: the shards are gathered)."""
    if config.method == "full":
        export_model(
            trainer,
            directory,
            metadata={"tokenizer_fingerprint": tokenizer.fingerprint(), "finetuned_from": config.model},
        )
        if trainer.is_main:
            tokenizer.save(directory / TOKENIZER_DIR)
        return
    state = full_state_dict(trainer.model) if trainer.mesh is not None else None
    if trainer.is_main:
        save_adapter(trainer.model, directory, state)
