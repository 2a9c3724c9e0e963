"""FinetuneConfig: what a fine-tune takes (base model, data, method and its settings) and the
training settings it runs with: the pretraining recipe's TrainConfig with the defaults a
fine-tune needs (FINETUNE_DEFAULTS, METHOD_DEFAULTS), any of which `train` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glm130b.adapters.folder import METHODS as ADAPTER_METHODS
from glm130b.adapters.lora import LORA_TARGETS
from glm130b.core.config_io import DictConfig, check_field, check_positive_int
from glm130b.core.errors import ConfigError
from glm130b.model.config import GLMConfig
from glm130b.quant.format import QuantScheme
from glm130b.train.builders import resolve_device
from glm130b.train.config import TrainConfig

METHODS = ("full", *ADAPTER_METHODS)  # every weight, or an adapter over the frozen base
QUANTIZED = {"int4": 4, "int8": 8}
TOKENIZER_DIR = "tokenizer"  # the tokenizer folder inside a model directory, the default tokenizer
# What a fine-tune changes of the pretraining recipe, and why; the rest (AdamW betas, clipping at
# 1.0, the spike guard, fp32 softmax, checkpoints and exact resume) is the recipe's.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "micro_batch_size": 1,
    "global_batch_size": 8,  # packed sequences per step (16 K tokens at 2048), a usual SFT batch
    "rampup_start_batch_size": None,  # the ramp-up eased pretraining's start from random weights
    "warmup_fraction": 0.03,  # a short warmup, as SFT recipes use
    "decay_fraction": 1.0,  # cosine over the whole run
    "embedding_grad_scale": 1.0,  # the shrink tamed early pretraining spikes; this model is trained
    # A fine-tune's batches are small, so its loss is noisier from step to step than pretraining's
    # 4224-sequence batches: only a loss 3x the recent median counts as a spike.
    "spike_guard": {"loss_ratio": 3.0},
    "log_every": 10,
    "eval_every": 100,
    "checkpoint_every": 100,
}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # a tenth of GLM-130B's pretraining peak (8e-5): the weights should move, not be relearnt
    "full": {"lr": 8e-6, "min_lr": 0.0, "weight_decay": 0.1},
    # the LoRA paper's and PEFT's usual range (1e-4 to 3e-4); no decay on adapters that start at 0
    "lora": {"lr": 2e-4, "min_lr": 0.0, "weight_decay": 0.0},
    # THUDM's ChatGLM-6B P-tuning v2 script (ptuning/train.sh: LR=2e-2)
    "ptuning": {"lr": 2e-2, "min_lr": 0.0, "weight_decay": 0.0},
}
# Packed sequences fill the model's context; GLM-130B's is 2048.
DEFAULT_SEQUENCE_LENGTH = 2048


@dataclass
class FinetuneConfig(DictConfig):
    config_label = "FinetuneConfig"

    model: str = ""  # the base model directory (glm130b.checkpoint)
    data: str = ""  # training records, JSON lines (glm130b.finetune.records)
    method: str = "lora"  # full | lora | ptuning
    valid_data: str = ""  # held-out records: validation loss during the run, exact match at its end
    tokenizer: str = ""  # default: the model directory's tokenizer folder
    # Quantize the frozen base on load: int4 | int8 | null (the base as stored; a directory written
    # by `glm130b quantize` is already quantized). Needs an adapter method: full trains the weights.
    quantized: str | None = None
    out_dir: str = "runs/finetune"
    epochs: float = 3.0  # passes over the packed training sequences (train.train_samples overrides)
    # LoRA (PEFT): rank, scale alpha / rank, dropout on the adapter input, the layers it adapts
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["query_key_value"])
    # P-tuning v2: virtual tokens per layer (THUDM's ChatGLM-6B script: PRE_SEQ_LEN=128)
    prefix_length: int = 128
    merge: bool = False  # also write the base with the LoRA adapter folded in (out_dir/merged)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (lr, global_batch_size, ...)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.quantized is not None and self.quantized not in QUANTIZED:
            raise ConfigError(f"quantized must be one of {', '.join(QUANTIZED)} or null; got {self.quantized!r}")
        if self.quantized and self.method == "full":
            raise ConfigError(
                "full fine-tuning trains every weight and a quantized weight cannot train: "
                "use --method lora (or ptuning) over a quantized base"
            )
        if self.merge and self.method != "lora":
            raise ConfigError(
                f"merge folds a LoRA adapter into the weights; method {self.method} has "
                + (
                    "nothing to merge"
                    if self.method == "full"
                    else "prefixes, which are extra keys and values, not a change of weights"
                )
            )
        check_field("epochs", self.epochs, float, lambda v: v > 0, "a positive number")
        check_positive_int("prefix_length", self.prefix_length)
        check_positive_int("lora_rank", self.lora_rank)
        check_field(
            "lora_targets",
            self.lora_targets,
            list,
            lambda v: v and set(v) <= set(LORA_TARGETS),
            f"a non-empty list of {', '.join(LORA_TARGETS)}",
        )
        check_field("train", self.train, dict, expected="a mapping of TrainConfig fields")

    # ------------------------------------------------------------------ derived
    @property
    def scheme(self) -> QuantScheme | None:
        return QuantScheme(QUANTIZED[self.quantized]) if self.quantized else None

    def tokenizer_dir(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.model) / TOKENIZER_DIR

    def sequence_length(self, base: GLMConfig) -> int:
        return self.train.get("sequence_length", min(DEFAULT_SEQUENCE_LENGTH, base.max_sequence_length))

    def train_config(self, base: GLMConfig, num_sequences: int) -> TrainConfig:
        """The run's TrainConfig: recipe < FINETUNE_DEFAULTS < METHOD_DEFAULTS < `train`; bf16 on
        CUDA, fp32 on the CPU; train_samples from `epochs` when `train` does not set it."""
        values: dict[str, Any] = {**FINETUNE_DEFAULTS, **METHOD_DEFAULTS[self.method]}
        values["precision"] = "bf16" if resolve_device(self.train.get("device", "auto")).type == "cuda" else "fp32"
        values.update(
            out_dir=self.out_dir, sequence_length=self.sequence_length(base), model=base.to_dict()
        )  # the base's own config, every field (the preset is replaced)
        for key, value in self.train.items():  # a section (spike_guard, parallel) merges field by field
            both = isinstance(value, dict) and isinstance(values.get(key), dict)
            values[key] = {**values[key], **value} if both else value
        if "train_samples" not in self.train:
            batch = values["global_batch_size"]
            values["train_samples"] = max(1, math.ceil(self.epochs * num_sequences / batch)) * batch
        return TrainConfig.from_dict(values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        data = dict(data)
        if isinstance(data.get("lora_targets"), str):  # "query_key_value,dense" from the command line
            data["lora_targets"] = [t.strip() for t in data["lora_targets"].split(",") if t.strip()]
        return super().from_dict(data)
