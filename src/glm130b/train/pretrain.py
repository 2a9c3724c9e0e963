"""`glm130b pretrain` as a function: data, model, training, export of the trained model and the
loss curve (`run_pretraining`)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from glm130b.checkpoint.model_dir import save_model
from glm130b.core.errors import GLMError
from glm130b.distributed.parallelize import full_state_dict
from glm130b.model.glm import GLM
from glm130b.objective.batch import TrainingBatch
from glm130b.tokenizer.tokenizers import Tokenizer, load_tokenizer
from glm130b.train.builders import build_model_and_optimizer
from glm130b.train.config import TrainConfig
from glm130b.train.data_setup import BatchSource, build_data
from glm130b.train.report import plot_loss_curve
from glm130b.train.trainer import RUN_CONFIG_FILE, Trainer

# What a run writes into its out_dir: checkpoints, metrics (and TensorBoard events), the exported
# model, its settings and the loss curve.
RUN_OUTPUTS = ("checkpoints", "metrics", "model", RUN_CONFIG_FILE, "loss_curve.png")


@dataclass
class PretrainResult:
    valid_losses: dict[str, float]
    valid_batches: dict[str, list[TrainingBatch]]
    train_source: BatchSource
    trained_micro_batches: list[int]  # indices into train_source of the updates the model kept
    model_dir: Path  # the trained model, in the glm130b.checkpoint format
    metrics_dir: Path
    loss_curve: Path | None
    stopped_early: bool  # at config.time_limit_s, before train_samples


def discard_run(out_dir: Path) -> None:
    """Remove what a run wrote into `out_dir` (RUN_OUTPUTS) so that a new run starts there; any
    other file in the folder stays."""
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def load_run_data(config: TrainConfig) -> tuple[Tokenizer, BatchSource, dict[str, list[TrainingBatch]]]:
    """The tokenizer of `config`, checked against the model's vocabulary, and its data (build_data)."""
    if not config.corpus or not config.tokenizer:
        raise GLMError(
            "set corpus (a prepared corpus directory) and tokenizer (its tokenizer directory), "
            "in the config file or as --corpus DIR --tokenizer DIR"
        )
    tokenizer = load_tokenizer(config.tokenizer)
    model_config = config.model_config()
    if tokenizer.vocab_size > model_config.vocab_size:
        raise GLMError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model_config.vocab_size} "
            f"rows; set model.vocab_size to at least {tokenizer.vocab_size}"
        )
    return (tokenizer, *build_data(config, tokenizer))


def run_pretraining(config: TrainConfig, show_progress: bool = True) -> PretrainResult:
    """Everything `glm130b pretrain` does: data, model, training, export, loss curve."""
    tokenizer, train_source, valid_batches = load_run_data(config)
    built = build_model_and_optimizer(config)
    trainer = Trainer(config, built, train_source, valid_batches, show_progress=show_progress)
    valid = trainer.train()
    model_dir, metrics_dir = Path(config.out_dir) / "model", Path(config.out_dir) / "metrics"
    export_model(trainer, model_dir, metadata={"tokenizer_fingerprint": tokenizer.fingerprint()})
    curve = None
    if trainer.is_main:
        tokenizer.save(model_dir / "tokenizer")
        curve = plot_loss_curve(metrics_dir, Path(config.out_dir) / "loss_curve.png")
    if built.mesh is not None:
        dist.barrier()  # the export is complete before any rank returns
        dist.destroy_process_group()
    return PretrainResult(
        valid,
        valid_batches,
        train_source,
        trainer.state.used_micro_batches(),
        model_dir,
        metrics_dir,
        curve,
        trainer.stopped_early,
    )


def export_model(trainer: Trainer, directory: Path, metadata: dict[str, str]) -> None:
    """The trained model in the glm130b.checkpoint format (official keys, whole tensors), written
    by rank 0. Collective in a distributed run: every rank takes part in gathering the shards."""
    metadata = {**metadata, "step": str(trainer.state.step)}
    if trainer.mesh is None:
        save_model(trainer.model, directory, metadata=metadata)
        return
    # the whole tensors arrive on rank 0 only
    state = _gather_stages(trainer) if trainer.runner is not None else full_state_dict(trainer.model)
    if trainer.is_main:
        with torch.device("meta"):
            plain = GLM(trainer.model.config)
        plain.load_state_dict(state, assign=True)
        save_model(plain, directory, metadata=metadata)


def _gather_stages(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The whole model's official-key state on rank 0, from the pipeline stages: each stage's full
    tensors (all-gathered over its dp / tp shards), sent by its dp 0, tp 0 rank. Collective."""
    # all_ranks: every stage's dp 0 / tp 0 rank needs its stage's tensors, not global rank 0 alone
    state = full_state_dict(trainer.model, all_ranks=True)
    sender = trainer.mesh["dp"].get_local_rank() == 0 and trainer.mesh["tp"].get_local_rank() == 0
    parts = [None] * dist.get_world_size() if trainer.is_main else None
    dist.gather_object(state if sender else {}, parts, dst=0)
    # the tied embedding arrives from the first and the last stage: identical copies
    return {k: v for part in (parts or []) for k, v in part.items()}
